pub mod actors;
pub mod book;
pub mod bus;
pub mod fuzzing;
pub mod replay;
pub mod wire;
pub mod workload;
