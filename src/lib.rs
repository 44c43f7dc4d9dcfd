pub mod book;
pub mod replay;
pub mod wire;
pub mod workload;
