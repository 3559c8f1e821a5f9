//! Bit mixing shared by the layers: the SplitMix64 output function (the
//! retry layer's jitter). The emulator has its own copy, so that it depends
//! only on the crate's public items.

/// SplitMix64's increment (the golden-ratio "gamma").
#[cfg(feature = "retry")]
pub(crate) const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: mixes one state value into 64 random bits.
#[cfg(feature = "retry")]
pub(crate) fn splitmix64(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
