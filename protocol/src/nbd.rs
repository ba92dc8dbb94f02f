//! NBD protocol (placeholder: being written).
