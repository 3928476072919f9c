//! The secure store's files as an attacker (or a bad disk) sees them: pack indexes parsed, bytes
//! flipped or swapped, whole trees copied, sized and searched. Formats: docs/store-format.md.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Magic of a pack index.
pub const IDX_MAGIC: &[u8; 4] = b"FRYX";
/// Bytes before the first index entry: magic, version u16, reserved u16, count u32.
pub const IDX_HEADER: usize = 12;
/// Bytes of one index entry: id (32), key id (16), offset u64, frame length u32.
pub const IDX_ENTRY: usize = 60;
/// Bytes of a chunk frame's header, before its sealed body.
pub const FRAME_HEADER: u64 = 56;

/// One chunk of a pack, as its index describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: [u8; 32],
    pub key: [u8; 16],
    pub offset: u64,
    pub len: u32,
}

impl IndexEntry {
    /// The first 8 bytes of the chunk id in hex: how ferry's errors name a chunk.
    pub fn short_id(&self) -> String {
        hex(&self.id[..8])
    }
}

/// A pack file, its index and the chunks the index lists.
#[derive(Debug, Clone)]
pub struct PackFiles {
    pub pack: PathBuf,
    pub idx: PathBuf,
    pub entries: Vec<IndexEntry>,
}

impl PackFiles {
    /// The pack's file name (`<hex id>.pack`).
    pub fn file_name(&self) -> String {
        file_name(&self.pack)
    }

    /// The pack's id: the hex stem both files share.
    pub fn id(&self) -> String {
        self.file_name().trim_end_matches(".pack").to_string()
    }

    /// The size of the pack file now.
    pub fn pack_len(&self) -> u64 {
        fs::metadata(&self.pack).map(|m| m.len()).unwrap_or(0)
    }
}

/// The indexed packs of `store`, largest first; there must be some sealed chunks.
#[track_caller]
pub fn packs_by_size(store: &Path) -> Vec<PackFiles> {
    let mut packs = indexed_packs(store);
    assert!(
        packs.iter().any(|p| !p.entries.is_empty()),
        "expected sealed chunks in {}/packs",
        store.display()
    );
    packs.sort_by_key(|p| std::cmp::Reverse(p.pack_len()));
    packs
}

/// Every pack of the store that has an index, sorted by name.
#[track_caller]
pub fn indexed_packs(store: &Path) -> Vec<PackFiles> {
    let mut packs: Vec<PackFiles> = dir_names(&store.join("packs"))
        .into_iter()
        .filter_map(|n| n.strip_suffix(".idx").map(str::to_string))
        .map(|stem| {
            let idx = store.join("packs").join(format!("{stem}.idx"));
            PackFiles {
                pack: store.join("packs").join(format!("{stem}.pack")),
                entries: read_index(&idx),
                idx,
            }
        })
        .collect();
    packs.sort_by(|a, b| a.pack.cmp(&b.pack));
    packs
}

/// The entries of a pack index; panics if it is not one.
#[track_caller]
pub fn read_index(idx: &Path) -> Vec<IndexEntry> {
    let bytes = fs::read(idx).unwrap_or_else(|e| panic!("cannot read {}: {e}", idx.display()));
    assert!(bytes.len() >= IDX_HEADER && &bytes[..4] == IDX_MAGIC, "{} is no pack index", idx.display());
    let count = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    assert_eq!(bytes.len(), IDX_HEADER + count * IDX_ENTRY, "{}: {count} entries announced", idx.display());
    bytes[IDX_HEADER..]
        .chunks_exact(IDX_ENTRY)
        .map(|e| IndexEntry {
            id: e[..32].try_into().expect("32 bytes"),
            key: e[32..48].try_into().expect("16 bytes"),
            offset: u64::from_le_bytes(e[48..56].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(e[56..60].try_into().expect("4 bytes")),
        })
        .collect()
}

/// Swaps where entries `a` and `b` of a pack index point (offset and length): each id then
/// names the other's frame.
#[track_caller]
pub fn swap_index_locations(idx: &Path, a: usize, b: usize) {
    let mut bytes = fs::read(idx).unwrap_or_else(|e| panic!("cannot read {}: {e}", idx.display()));
    let loc = |i: usize| IDX_HEADER + i * IDX_ENTRY + 48..IDX_HEADER + (i + 1) * IDX_ENTRY;
    let (la, lb) = (bytes[loc(a)].to_vec(), bytes[loc(b)].to_vec());
    bytes[loc(a)].copy_from_slice(&lb);
    bytes[loc(b)].copy_from_slice(&la);
    fs::write(idx, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", idx.display()));
}

/// Inverts every bit of the byte at `offset` of `path`; returns the byte it held.
#[track_caller]
pub fn flip_byte(path: &Path, offset: u64) -> u8 {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut byte))
        .unwrap_or_else(|e| panic!("cannot read byte {offset} of {}: {e}", path.display()));
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(&[!byte[0]]))
        .and_then(|_| file.sync_all())
        .unwrap_or_else(|e| panic!("cannot write byte {offset} of {}: {e}", path.display()));
    byte[0]
}

/// Swaps the `len` bytes at `a` with those at `b` in `path` (the ranges must not overlap).
#[track_caller]
pub fn swap_ranges(path: &Path, a: u64, b: u64, len: usize) {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut read_at = |at: u64| {
        let mut buf = vec![0u8; len];
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.read_exact(&mut buf))
            .unwrap_or_else(|e| panic!("cannot read {len} bytes at {at} of {}: {e}", path.display()));
        buf
    };
    let (bytes_a, bytes_b) = (read_at(a), read_at(b));
    for (at, bytes) in [(a, bytes_b), (b, bytes_a)] {
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.write_all(&bytes))
            .unwrap_or_else(|e| panic!("cannot write at {at} of {}: {e}", path.display()));
    }
    file.sync_all().expect("sync");
}

/// The names in a directory, sorted; empty if it does not exist.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Every regular file at or below `dir`, symlinks not followed, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// Total size of the regular files at or below `dir`.
pub fn tree_size(dir: &Path) -> u64 {
    files_under(dir).iter().filter_map(|f| fs::metadata(f).ok()).map(|m| m.len()).sum()
}

/// True if `needle` occurs in `hay`.
pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut from = 0;
    while let Some(i) = hay[from..].iter().position(|b| *b == first) {
        let at = from + i;
        if hay.len() - at < needle.len() {
            return false;
        }
        if &hay[at + 1..at + needle.len()] == rest {
            return true;
        }
        from = at + 1;
    }
    false
}

/// The files at or below `dir` whose bytes contain `needle` (each read whole).
#[track_caller]
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| {
            let bytes = fs::read(f).unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()));
            contains_bytes(&bytes, needle)
        })
        .collect()
}

/// Copies the tree at `from` to `to` (which must not exist), keeping permission bits.
#[track_caller]
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir(to).unwrap_or_else(|e| panic!("cannot create {}: {e}", to.display()));
    let mode = fs::metadata(from).expect("stat").permissions().mode();
    for e in fs::read_dir(from).unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display())) {
        let e = e.expect("dir entry");
        let target = to.join(e.file_name());
        let kind = e.file_type().expect("file type");
        if kind.is_dir() {
            copy_tree(&e.path(), &target);
        } else if kind.is_file() {
            fs::copy(e.path(), &target)
                .unwrap_or_else(|err| panic!("cannot copy {}: {err}", e.path().display()));
        }
    }
    fs::set_permissions(to, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Replaces the tree at `to` with a copy of the tree at `from`.
#[track_caller]
pub fn replace_tree(from: &Path, to: &Path) {
    if to.exists() {
        fs::remove_dir_all(to).unwrap_or_else(|e| panic!("cannot remove {}: {e}", to.display()));
    }
    copy_tree(from, to);
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needles_are_found_anywhere() {
        assert!(contains_bytes(b"abcabd", b"abd"));
        assert!(contains_bytes(b"abd", b"abd"));
        assert!(!contains_bytes(b"abcab", b"abd"));
        assert!(!contains_bytes(b"ab", b"abd"));
        assert!(contains_bytes(b"", b""));
    }

    #[test]
    fn indexes_parse_and_swap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = dir.path().join("00.idx");
        let mut bytes = b"FRYX\x01\x00\x00\x00\x02\x00\x00\x00".to_vec();
        for (n, off, len) in [(1u8, 0u64, 100u32), (2, 100, 70)] {
            bytes.extend([n; 32]);
            bytes.extend([9u8; 16]);
            bytes.extend(off.to_le_bytes());
            bytes.extend(len.to_le_bytes());
        }
        fs::write(&idx, &bytes).expect("write");
        let entries = read_index(&idx);
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[1].id[0], entries[1].offset, entries[1].len), (2, 100, 70));
        assert_eq!(entries[0].short_id(), "0101010101010101");
        swap_index_locations(&idx, 0, 1);
        let swapped = read_index(&idx);
        assert_eq!((swapped[0].id[0], swapped[0].offset, swapped[0].len), (1, 100, 70));
        assert_eq!((swapped[1].id[0], swapped[1].offset, swapped[1].len), (2, 0, 100));
    }

    #[test]
    fn bytes_flip_and_ranges_swap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        fs::write(&f, b"0123456789").expect("write");
        assert_eq!(flip_byte(&f, 3), b'3');
        assert_eq!(fs::read(&f).expect("read")[3], !b'3');
        flip_byte(&f, 3);
        swap_ranges(&f, 0, 6, 3);
        assert_eq!(fs::read(&f).expect("read"), b"6783450129");
        assert_eq!(files_containing(dir.path(), b"345"), vec![f]);
        assert!(files_containing(dir.path(), b"0123").is_empty());
        let other = tempfile::tempdir().expect("tempdir");
        let copy = other.path().join("copy");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o710)).expect("chmod");
        copy_tree(dir.path(), &copy);
        assert_eq!(fs::read(copy.join("f")).expect("read copy"), b"6783450129");
        let mode = fs::metadata(&copy).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o710);
        assert_eq!(tree_size(&copy), 10);
    }
}
