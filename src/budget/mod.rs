//! Token budget: pace RPM, ITPM and OTPM before sending.
//!
//! (Module docs, the layer, service, future and usage parsing are written by
//! the budget work; `ledger` and `limits` hold the accounting.)

pub mod ledger;
pub mod limits;
mod scan;
