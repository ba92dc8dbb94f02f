//! NBD server (placeholder: being written).
