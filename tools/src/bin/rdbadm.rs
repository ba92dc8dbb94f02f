//! rdbadm: the drbdadm-like CLI (placeholder: being written).
fn main() {}
