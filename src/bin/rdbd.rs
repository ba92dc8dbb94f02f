//! rdbd: the rdb daemon (placeholder: being written).
fn main() {}
