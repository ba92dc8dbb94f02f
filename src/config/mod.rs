//! Configuration in DRBD syntax (placeholder: being written).
