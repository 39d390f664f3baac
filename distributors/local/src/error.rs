//! The one table mapping OS errors to [`Error::Transient`] / [`Error::Permanent`].
//!
//! | errno | class | why |
//! |---|---|---|
//! | `EAGAIN` | transient | process or thread limit reached (fork); try again later |
//! | `ENOMEM` | transient | out of memory for a new process |
//! | `EMFILE` | transient | this process ran out of file descriptors |
//! | `ENFILE` | transient | the system ran out of file descriptors |
//! | `EINTR` | transient | interrupted by a signal |
//! | `ENOSPC` | transient | disk full (state or log files) |
//! | `EDQUOT` | transient | disk quota exceeded |
//! | `EBUSY` | transient | resource busy |
//! | `ETXTBSY` | transient | the program file is being written |
//! | `ENOENT` | permanent | program or working directory does not exist |
//! | `EACCES` | permanent | not executable / no permission |
//! | `EPERM` | permanent | operation not permitted |
//! | `ENOEXEC` | permanent | not an executable format |
//! | `ENOTDIR` | permanent | a path component is not a directory |
//! | `EISDIR` | permanent | the program is a directory |
//! | `ELOOP` | permanent | symlink loop |
//! | `ENAMETOOLONG` | permanent | path too long |
//! | `E2BIG` | permanent | argument list + environment too long |
//! | `EROFS` | permanent | read-only file system (state directory) |
//! | anything else, or no errno | permanent | unknown: retrying blindly could loop |
//!
//! For `run`, permanent means the execution ends `Rejected` with the message; transient means the
//! engine retries `run` (with the same request id) after a backoff.

use std::io;

use distributor_core::Error;

/// How an OS error is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Retrying the same call may succeed.
    Transient,
    /// Retrying will not help.
    Permanent,
}

/// The table: errno → class.
const TABLE: &[(i32, Class)] = &[
    (libc::EAGAIN, Class::Transient),
    (libc::ENOMEM, Class::Transient),
    (libc::EMFILE, Class::Transient),
    (libc::ENFILE, Class::Transient),
    (libc::EINTR, Class::Transient),
    (libc::ENOSPC, Class::Transient),
    (libc::EDQUOT, Class::Transient),
    (libc::EBUSY, Class::Transient),
    (libc::ETXTBSY, Class::Transient),
    (libc::ENOENT, Class::Permanent),
    (libc::EACCES, Class::Permanent),
    (libc::EPERM, Class::Permanent),
    (libc::ENOEXEC, Class::Permanent),
    (libc::ENOTDIR, Class::Permanent),
    (libc::EISDIR, Class::Permanent),
    (libc::ELOOP, Class::Permanent),
    (libc::ENAMETOOLONG, Class::Permanent),
    (libc::E2BIG, Class::Permanent),
    (libc::EROFS, Class::Permanent),
];

/// The class of `e` per the table (permanent when it has no errno or the errno is not listed).
pub(crate) fn class_of(e: &io::Error) -> Class {
    e.raw_os_error()
        .and_then(|code| TABLE.iter().find(|(c, _)| *c == code))
        .map_or(Class::Permanent, |(_, class)| *class)
}

/// Wraps `e` as the framework error its class calls for; `what` says what was being done
/// (`starting \`make\``, `writing /x/spec.json`) and prefixes the message.
pub(crate) fn classify(what: impl std::fmt::Display, e: io::Error) -> Error {
    let message = format!("{what}: {e}");
    match class_of(&e) {
        Class::Transient => Error::transient_from(message, e),
        Class::Permanent => Error::permanent_from(message, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! row {
        ($name:ident, $errno:expr, $class:expr) => {
            #[test]
            fn $name() {
                let e = classify("starting `x`", io::Error::from_raw_os_error($errno));
                assert_eq!(e.is_transient(), $class == Class::Transient, "{e}");
                assert!(e.to_string().contains("starting `x`"), "{e}");
            }
        };
    }

    row!(eagain_is_transient, libc::EAGAIN, Class::Transient);
    row!(enomem_is_transient, libc::ENOMEM, Class::Transient);
    row!(emfile_is_transient, libc::EMFILE, Class::Transient);
    row!(enfile_is_transient, libc::ENFILE, Class::Transient);
    row!(eintr_is_transient, libc::EINTR, Class::Transient);
    row!(enospc_is_transient, libc::ENOSPC, Class::Transient);
    row!(edquot_is_transient, libc::EDQUOT, Class::Transient);
    row!(ebusy_is_transient, libc::EBUSY, Class::Transient);
    row!(etxtbsy_is_transient, libc::ETXTBSY, Class::Transient);
    row!(enoent_is_permanent, libc::ENOENT, Class::Permanent);
    row!(eacces_is_permanent, libc::EACCES, Class::Permanent);
    row!(eperm_is_permanent, libc::EPERM, Class::Permanent);
    row!(enoexec_is_permanent, libc::ENOEXEC, Class::Permanent);
    row!(enotdir_is_permanent, libc::ENOTDIR, Class::Permanent);
    row!(eisdir_is_permanent, libc::EISDIR, Class::Permanent);
    row!(eloop_is_permanent, libc::ELOOP, Class::Permanent);
    row!(
        enametoolong_is_permanent,
        libc::ENAMETOOLONG,
        Class::Permanent
    );
    row!(e2big_is_permanent, libc::E2BIG, Class::Permanent);
    row!(erofs_is_permanent, libc::EROFS, Class::Permanent);
    row!(unlisted_errno_is_permanent, libc::EXDEV, Class::Permanent);

    #[test]
    fn error_without_errno_is_permanent() {
        let e = classify("reading spec", io::Error::other("corrupt"));
        assert!(!e.is_transient());
    }

    #[test]
    fn every_row_has_a_test() {
        // 19 rows above, each with a `row!` test; this guards against adding a row silently.
        assert_eq!(TABLE.len(), 19);
    }
}
