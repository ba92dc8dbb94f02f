//! Control protocol (placeholder: being written).
