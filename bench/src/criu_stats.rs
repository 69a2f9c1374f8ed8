//! CRIU's `stats-dump`: how long a dump kept the tasks frozen. CRIU writes it next to its log
//! (the podsnap shim copies it into each container's checkpoint). Format: two magics (u32,
//! little endian: the service image magic, then the stats magic), the entry's size (u32), then
//! a `stats_entry` protobuf (images/stats.proto) whose field 1 is the `dump_stats_entry`.

use std::path::Path;

const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// The times of one CRIU dump, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Seizing the tasks (the cgroup may be frozen already).
    pub freezing_us: u64,
    /// From seized to resumed: the whole dump, memory included.
    pub frozen_us: u64,
    pub memdump_us: u64,
    pub memwrite_us: u64,
    pub pages_written: u64,
}

impl DumpStats {
    /// How long CRIU held the tasks, seconds.
    pub fn dump_seconds(&self) -> f64 {
        (self.freezing_us + self.frozen_us) as f64 / 1e6
    }
}

pub fn read(path: &Path) -> Result<DumpStats, String> {
    let data = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    parse(&data).map_err(|e| format!("{}: {e}", path.display()))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

pub fn parse(data: &[u8]) -> Result<DumpStats, String> {
    if u32_at(data, 0) != Some(IMG_SERVICE_MAGIC) || u32_at(data, 4) != Some(STATS_MAGIC) {
        return Err("not a CRIU stats image (bad magic)".into());
    }
    let size = u32_at(data, 8).ok_or("truncated")? as usize;
    let entry = data.get(12..12 + size).ok_or("truncated entry")?;
    let mut dump = None;
    for_each_field(entry, |field, value| {
        if let (1, Value::Bytes(b)) = (field, value) {
            dump = Some(b);
        }
    })?;
    let dump = dump.ok_or("no dump statistics")?;
    let mut stats = DumpStats::default();
    for_each_field(dump, |field, value| {
        if let Value::Int(v) = value {
            match field {
                1 => stats.freezing_us = v,
                2 => stats.frozen_us = v,
                3 => stats.memdump_us = v,
                4 => stats.memwrite_us = v,
                7 => stats.pages_written = v,
                _ => {}
            }
        }
    })?;
    Ok(stats)
}

enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

fn varint(data: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*at).ok_or("truncated varint")?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

/// Calls `f` with every field of a protobuf message (fixed-width fields as integers).
fn for_each_field<'a>(data: &'a [u8], mut f: impl FnMut(u64, Value<'a>)) -> Result<(), String> {
    let mut at = 0;
    while at < data.len() {
        let key = varint(data, &mut at)?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Value::Int(varint(data, &mut at)?),
            1 | 5 => {
                let width = if key & 7 == 1 { 8 } else { 4 };
                let bytes = data.get(at..at + width).ok_or("truncated fixed field")?;
                at += width;
                let mut buf = [0u8; 8];
                buf[..width].copy_from_slice(bytes);
                Value::Int(u64::from_le_bytes(buf))
            }
            2 => {
                let len = varint(data, &mut at)? as usize;
                let bytes = data.get(at..at + len).ok_or("truncated field")?;
                at += len;
                Value::Bytes(bytes)
            }
            t => return Err(format!("unsupported protobuf wire type {t}")),
        };
        f(field, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_statistics_are_read() {
        // freezing 300 us, frozen 1_234_567 us, memdump 5, memwrite 6, pages_written 262144,
        // irmap_resolve (8) as an unknown field; then a restore entry (field 2) that is skipped.
        let dump = [
            0x08, 0xac, 0x02, // 1: 300
            0x10, 0x87, 0xad, 0x4b, // 2: 1234567
            0x18, 0x05, 0x20, 0x06, // 3: 5, 4: 6
            0x38, 0x80, 0x80, 0x10, // 7: 262144
            0x40, 0x01, // 8: 1
        ];
        let mut entry = vec![0x0a, dump.len() as u8];
        entry.extend_from_slice(&dump);
        entry.extend_from_slice(&[0x12, 0x02, 0x08, 0x01]);
        let mut image = Vec::new();
        image.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        image.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        image.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        image.extend_from_slice(&entry);
        let stats = parse(&image).unwrap();
        assert_eq!(
            stats,
            DumpStats {
                freezing_us: 300,
                frozen_us: 1_234_567,
                memdump_us: 5,
                memwrite_us: 6,
                pages_written: 262_144,
            }
        );
        assert!((stats.dump_seconds() - 1.234_867).abs() < 1e-9);
        assert!(parse(&image[..image.len() - 1]).is_err());
        assert!(parse(&[0; 16]).is_err());
    }
}
