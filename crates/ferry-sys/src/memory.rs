//! Hints about this process's own memory.

/// Asks for transparent huge pages behind `buf` (where the system gives them only on request,
/// `madvise` mode), before it is first written: a table of tens of MiB written at random then
/// takes a few 2 MiB faults instead of thousands of 4 KiB ones. Only advice: nothing changes
/// if the kernel declines, and `buf`'s contents are not touched (so it may hold values or, as
/// a `Vec`'s spare capacity, none yet).
pub fn prefer_huge_pages<T>(buf: &mut [T]) {
    const HUGE: usize = 2 << 20;
    let start = buf.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(buf);
    let (from, to) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
    if to <= from {
        return;
    }
    // SAFETY: [from, to) lies inside `buf`, memory this process owns and the caller borrows
    // mutably; MADV_HUGEPAGE changes how its pages are backed, never what they hold, and an
    // error (a kernel without THP) leaves it as it was.
    unsafe {
        libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;

    #[test]
    fn advice_keeps_what_the_buffer_holds() {
        let mut v: Vec<u64> = Vec::with_capacity(3 << 20);
        v.extend(0..1000);
        prefer_huge_pages(v.spare_capacity_mut());
        v.extend(1000..(3 << 20));
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
        // Too small for one huge page: nothing to do, nothing broken.
        prefer_huge_pages(&mut [MaybeUninit::<u8>::uninit(); 16]);
    }
}
