//! `cargo fuzz run images`: the body is `afinar::fuzz_targets::images`,
//! shared with the corpus replay test (crates/afinar/tests/fuzz_corpus.rs).
#![no_main]

#[global_allocator]
static ALLOC: afinar::fuzz_targets::CappedAlloc = afinar::fuzz_targets::CappedAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| afinar::fuzz_targets::images(data));
