//! Memory shared with peers (device servers, vhost-user back ends): a memfd whose size is
//! sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, `fcntl(2)`), so a peer holding the
//! descriptor can read and write the memory but never truncate it under the VMM's mappings
//! (which would kill the VMM with SIGBUS on its next access) or change the seals.

use std::fs::File;
use std::io;

use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};

/// A memfd named `name` of `size` bytes (on 2 MiB hugetlb pages with `huge`), its size sealed.
///
/// # Errors
/// `memfd_create`, `ftruncate` or `F_ADD_SEALS` failed (the name says which).
pub fn sealed(name: &str, size: u64, huge: bool) -> io::Result<File> {
    let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    if huge {
        flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
    }
    let fd = memfd_create(name, flags).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("memfd_create {name}: {e}"),
        )
    })?;
    let file = File::from(fd);
    file.set_len(size)?;
    fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(|e| io::Error::other(format!("sealing {name}: {e}")))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_can_write_but_not_resize_or_unseal() {
        let f = sealed("seal-test", 1 << 20, false).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"data", 4096).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        // What a hostile peer would do with the descriptor: each is refused.
        for len in [0, 4096, 2 << 20] {
            let e = f.set_len(len).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "set_len({len})");
        }
        assert!(
            fcntl_add_seals(&f, SealFlags::WRITE).is_err(),
            "seals are sealed"
        );
        assert_eq!(
            rustix::fs::fcntl_get_seals(&f).unwrap(),
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL
        );
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    }
}
