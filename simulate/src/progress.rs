//! The progress bar of a run on the wall clock (indicatif): one per
//! strategy, on stderr, drawn only when stderr is a terminal.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Requests finished and failed, shared by the workers, shown as a bar.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
    failed: Arc<AtomicUsize>,
}

impl Progress {
    /// A bar for `total` requests of strategy `name`, drawn on stderr when
    /// `visible` and stderr is a terminal (never in tests or CI logs), hidden
    /// otherwise.
    pub fn new(name: &str, total: usize, visible: bool) -> Progress {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let style =
            ProgressStyle::with_template("  {prefix:<17} [{bar:30}] {pos}/{len} ({msg}) {elapsed}")
                .map_or_else(
                    |_| ProgressStyle::default_bar(),
                    |s| s.progress_chars("#>."),
                );
        let bar = ProgressBar::with_draw_target(Some(total as u64), target)
            .with_style(style)
            .with_prefix(name.to_string())
            .with_message("0 failed");
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(250));
        }
        Progress {
            bar,
            failed: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// One request finished, well or not.
    pub fn record(&self, ok: bool) {
        if !ok {
            let failed = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
            self.bar.set_message(format!("{failed} failed"));
        }
        self.bar.inc(1);
    }

    /// Requests finished so far, and how many of them failed.
    #[cfg(test)]
    fn counts(&self) -> (u64, usize) {
        (self.bar.position(), self.failed.load(Ordering::Relaxed))
    }

    /// Stops the bar, leaving its last state on its own line of the
    /// terminal.
    pub fn finish(&self) {
        self.bar.finish();
        if !self.bar.is_hidden() {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_finished_and_failed_requests_when_hidden() {
        let p = Progress::new("naive", 3, false);
        p.record(true);
        p.record(false);
        p.clone().record(false);
        assert_eq!(p.counts(), (3, 2));
        p.finish();
    }
}
