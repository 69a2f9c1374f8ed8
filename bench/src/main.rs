//! podsnap benchmarks (placeholder).
fn main() {}
