//! Retrying a system call that a signal interrupted.

use std::io;

/// Calls `call` until it returns a non-negative value, which it returns, or fails with an
/// error other than `EINTR` (read from `errno` right after the failed call).
pub(crate) fn retry_eintr<T>(mut call: impl FnMut() -> T) -> io::Result<T>
where
    T: Copy + PartialOrd + From<i8>,
{
    loop {
        let rc = call();
        if rc >= T::from(0) {
            return Ok(rc);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_calls_are_retried_and_other_errors_returned() {
        let mut tries = 0;
        let rc = retry_eintr(|| {
            tries += 1;
            if tries < 3 {
                // A failed call: errno set as the kernel would.
                set_errno(libc::EINTR);
                -1i32
            } else {
                7
            }
        });
        assert_eq!(rc.expect("retried until it succeeded"), 7);
        assert_eq!(tries, 3);
        let err = retry_eintr(|| {
            set_errno(libc::EBADF);
            -1isize
        })
        .expect_err("EBADF is not retried");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    fn set_errno(code: i32) {
        // SAFETY: __errno_location returns this thread's errno, valid for the thread's life.
        unsafe { *libc::__errno_location() = code };
    }
}
