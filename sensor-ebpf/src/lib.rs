//! The kernel/user ABI of Keywatch: every type that crosses between the eBPF programs and the
//! sensor lives here, once. `no_std`, `#[repr(C)]`, fixed-width integers, explicit padding.
//!
//! A record in the ring buffer is an [`EventHeader`] followed by the payload its `kind` names.
//! Kind numbers are never reused; userspace decodes with checked conversions and length checks.
#![no_std]

pub mod abi;

pub use abi::*;
