//! Token budget: pace RPM, ITPM and OTPM before sending (in progress).
