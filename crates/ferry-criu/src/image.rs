//! Reading CRIU's image files: a magic header, then entries of `u32 length` + protobuf. Image
//! files come from checkpoints and are treated as hostile: every length is capped and checked.

use std::fs;
use std::path::Path;

use prost::Message;

/// First word of ordinary images; the image's own magic follows.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// First word of service files (stats, irmap cache); the file's own magic follows.
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `inventory.img` starts with its own magic alone.
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// No protobuf entry in an image ferry reads is near this size.
pub const MAX_ENTRY: usize = 16 << 20;
/// ferry reads whole small images only (inventory, pstree, ...), never page data.
pub const MAX_IMAGE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("image too short for its header")]
    Short,
    #[error("unexpected magic {found:#010x} (expected {expected:#010x})")]
    Magic { found: u32, expected: u32 },
    #[error("entry at offset {offset} claims {len} bytes, beyond the cap or the file")]
    EntryLength { offset: usize, len: usize },
    #[error("entry at offset {offset} is not valid protobuf: {detail}")]
    Decode { offset: usize, detail: String },
}

/// The image's magic and the offset where its entries start.
pub fn header(data: &[u8]) -> Result<(u32, usize), ImageError> {
    let first = read_u32(data, 0).ok_or(ImageError::Short)?;
    if first == IMG_COMMON_MAGIC || first == IMG_SERVICE_MAGIC {
        let own = read_u32(data, 4).ok_or(ImageError::Short)?;
        return Ok((own, 8));
    }
    Ok((first, 4))
}

/// The raw protobuf entries of an image, after its header.
pub fn entries(data: &[u8], start: usize) -> Result<Vec<&[u8]>, ImageError> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < data.len() {
        let len = read_u32(data, pos).ok_or(ImageError::Short)? as usize;
        let body = pos + 4;
        if len > MAX_ENTRY || body.checked_add(len).is_none_or(|end| end > data.len()) {
            return Err(ImageError::EntryLength { offset: pos, len });
        }
        out.push(&data[body..body + len]);
        pos = body + len;
    }
    Ok(out)
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// The fields of `inventory_entry` ferry uses.
#[derive(Clone, PartialEq, Message)]
pub struct InventoryEntry {
    #[prost(uint32, required, tag = "1")]
    pub img_version: u32,
    #[prost(uint32, optional, tag = "11")]
    pub network_lock_method: Option<u32>,
    #[prost(string, optional, tag = "13")]
    pub dump_criu_run_id: Option<String>,
}

/// Parses `inventory.img` bytes.
pub fn parse_inventory(data: &[u8]) -> Result<InventoryEntry, ImageError> {
    let (magic, start) = header(data)?;
    if magic != INVENTORY_MAGIC {
        return Err(ImageError::Magic { found: magic, expected: INVENTORY_MAGIC });
    }
    let first = *entries(data, start)?.first().ok_or(ImageError::Short)?;
    InventoryEntry::decode(first).map_err(|e| ImageError::Decode { offset: start, detail: e.to_string() })
}

/// Reads `DIR/inventory.img`.
pub fn read_inventory(images_dir: &Path) -> Result<InventoryEntry, ImageError> {
    let path = images_dir.join("inventory.img");
    let read_err = |detail: String| ImageError::Read { path: path.display().to_string(), detail };
    let md = fs::symlink_metadata(&path).map_err(|e| read_err(e.to_string()))?;
    if !md.is_file() || md.len() > MAX_IMAGE {
        return Err(read_err("not a regular file of reasonable size".into()));
    }
    parse_inventory(&fs::read(&path).map_err(|e| read_err(e.to_string()))?)
}

/// True when `table` (an nftables table name without family) is the network lock CRIU made for
/// the dump with this run id: CRIU names it `CRIU-` + the run id, cut to its buffer's size.
pub fn is_lock_table_of(table: &str, run_id: &str) -> bool {
    table.strip_prefix("CRIU-").is_some_and(|id| id.len() >= 8 && run_id.starts_with(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVENTORY: &[u8] = include_bytes!("../tests/fixtures/inventory.img");

    #[test]
    fn reads_a_real_inventory() {
        let inv = parse_inventory(INVENTORY).expect("inventory");
        let run_id = inv.dump_criu_run_id.expect("run id");
        assert_eq!(run_id.len(), 36, "{run_id}");
        assert!(is_lock_table_of(&format!("CRIU-{}", &run_id[..21]), &run_id));
        assert!(!is_lock_table_of("CRIU-0000", &run_id));
        assert!(!is_lock_table_of("filter", &run_id));
    }

    #[test]
    fn refuses_other_images_and_damage() {
        let mut wrong = INVENTORY.to_vec();
        wrong[0] ^= 0xff;
        assert!(matches!(parse_inventory(&wrong), Err(ImageError::Magic { .. })));
        assert_eq!(parse_inventory(&INVENTORY[..3]), Err(ImageError::Short));
        let mut long = INVENTORY[..8].to_vec();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse_inventory(&long), Err(ImageError::EntryLength { .. })));
        assert!(parse_inventory(&INVENTORY[..INVENTORY.len() - 1]).is_err());
    }

    #[test]
    fn common_magic_header_skips_two_words() {
        let mut img = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        img.extend_from_slice(&0x1234_5678u32.to_le_bytes());
        img.extend_from_slice(&2u32.to_le_bytes());
        img.extend_from_slice(&[0x08, 0x01]);
        let (magic, start) = header(&img).expect("header");
        assert_eq!((magic, start), (0x1234_5678, 8));
        assert_eq!(entries(&img, start).expect("entries"), vec![&[0x08u8, 0x01][..]]);
    }
}
