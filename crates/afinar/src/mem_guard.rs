//! A per-thread memory limit for code that runs untrusted input, today a chat
//! template's render (`hub::chat_template`).
//!
//! [`limit`] runs a closure with a byte budget. While it runs, the global
//! allocator wrapper [`Guarded`] (and the fuzz targets' `CappedAlloc`) counts
//! the bytes that thread allocates minus the ones it frees, and refuses to go
//! past the budget: the process prints what ran and the limit, then aborts.
//! The allocation that would cross the limit is never made.
//!
//! This is the backstop, not the normal way out. Chat templates are first
//! bounded by minijinja's fuel, which fails the render with an error long
//! before this limit (see `hub/chat_template.rs`); the guard catches what no
//! fuel accounts for, such as the text of a huge value formatted inside an
//! operator. An allocator cannot return an error to its caller (and must not
//! unwind), so stopping the process is the only safe answer there.
//!
//! Only binaries whose global allocator calls these hooks are guarded: the
//! `afinar` CLI, the fuzz targets and the tests that install one. Elsewhere
//! [`limit`] runs its closure unguarded.

use std::cell::Cell;

struct Budget {
    /// Bytes allowed; 0 when no limit is active on this thread.
    limit: Cell<usize>,
    /// Bytes allocated minus bytes freed since the limit started.
    live: Cell<isize>,
    /// The most `live` reached since the limit started.
    peak: Cell<isize>,
    what: Cell<&'static str>,
}

thread_local! {
    // const-initialised and without a destructor: safe to touch from the allocator.
    static BUDGET: Budget = const {
        Budget {
            limit: Cell::new(0),
            live: Cell::new(0),
            peak: Cell::new(0),
            what: Cell::new(""),
        }
    };
}

/// Runs `f` with at most `bytes` of memory allocated by this thread at any
/// moment (`what` names it in the message if it goes over). Returns `f`'s
/// result and the peak of memory it held, in bytes (0 where no guarded
/// allocator is installed). Inside another `limit`, the inner one applies
/// while it runs and its bytes count towards the outer one's peak.
pub fn limit<R>(bytes: usize, what: &'static str, f: impl FnOnce() -> R) -> (R, usize) {
    /// The outer limit, put back when the inner one ends (or unwinds).
    struct Restore(usize, isize, isize, &'static str);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUDGET.with(|b| {
                let (inner_live, inner_peak) = (b.live.get(), b.peak.get());
                b.limit.set(self.0);
                b.live.set(self.1.saturating_add(inner_live));
                b.peak.set(self.2.max(self.1.saturating_add(inner_peak)));
                b.what.set(self.3);
            });
        }
    }
    let restore = BUDGET.with(|b| {
        let saved = Restore(b.limit.get(), b.live.get(), b.peak.get(), b.what.get());
        b.limit.set(bytes.max(1));
        b.live.set(0);
        b.peak.set(0);
        b.what.set(what);
        saved
    });
    let r = f();
    let peak = BUDGET.with(|b| b.peak.get().max(0) as usize);
    drop(restore);
    (r, peak)
}

/// Called by a guarded allocator before it allocates `size` bytes.
#[inline]
pub fn on_alloc(size: usize) {
    let _ = BUDGET.try_with(|b| {
        let limit = b.limit.get();
        if limit == 0 {
            return;
        }
        let live = b.live.get().saturating_add(size as isize);
        if live > limit as isize {
            over_limit(b.what.get(), limit);
        }
        b.live.set(live);
        if live > b.peak.get() {
            b.peak.set(live);
        }
    });
}

/// Called by a guarded allocator when it frees `size` bytes.
#[inline]
pub fn on_dealloc(size: usize) {
    let _ = BUDGET.try_with(|b| {
        if b.limit.get() != 0 {
            b.live.set(b.live.get().saturating_sub(size as isize));
        }
    });
}

/// Called by a guarded allocator before it resizes a block.
#[inline]
pub fn on_realloc(old: usize, new: usize) {
    if new >= old {
        on_alloc(new - old);
    } else {
        on_dealloc(old - new);
    }
}

/// Prints "afinar: WHAT needed more than N MiB of memory (its limit); stopped"
/// without allocating, and aborts.
#[cold]
fn over_limit(what: &str, limit: usize) -> ! {
    let mut buf = [0u8; 256];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        let k = s.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&s[..k]);
        n += k;
    };
    put(b"afinar: ");
    put(what.as_bytes());
    put(b" needed more than ");
    let mut digits = [0u8; 20];
    let mut d = digits.len();
    let mut mib = limit >> 20;
    loop {
        d -= 1;
        digits[d] = b'0' + (mib % 10) as u8;
        mib /= 10;
        if mib == 0 {
            break;
        }
    }
    put(&digits[d..]);
    put(b" MiB of memory (its limit); stopped\n");
    // SAFETY: writes n initialised bytes of buf to stderr; no allocation.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
    }
    std::process::abort();
}

/// A global allocator that enforces [`limit`] on top of `A`:
/// `#[global_allocator] static A: Guarded<mimalloc::MiMalloc> = Guarded(mimalloc::MiMalloc);`
pub struct Guarded<A>(pub A);

// SAFETY: every call is forwarded unchanged to `A`; the hooks only count.
unsafe impl<A: std::alloc::GlobalAlloc> std::alloc::GlobalAlloc for Guarded<A> {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        on_alloc(layout.size());
        self.0.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        on_alloc(layout.size());
        self.0.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        on_dealloc(layout.size());
        self.0.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        on_realloc(layout.size(), new);
        self.0.realloc(ptr, layout, new)
    }
}
