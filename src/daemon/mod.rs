//! The rdbd daemon (placeholder: being written).
