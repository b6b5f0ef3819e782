//! Claims (section 4).

use keyclaim::backend::{RawClaim, RawClaimedKey};
use keyclaim::{ClaimTarget, Error};

use redb::ReadableTable;

use super::WriteTables;
use crate::error::Fatal;

/// A claim (section 4): per target, the keys at the head of the (device,
/// algorithm) queue, which moves past them (they stay behind it as the
/// remembered issued keys, R3.4); else the fallback key, marked used. The
/// keys' JSON is rebuilt by the caller ([`RawClaim::decode`]), so
/// that the writer thread does only storage work. Core clamped the counts
/// (R8.3) and left out targets of 0.
pub(crate) fn claim(t: &mut WriteTables<'_>, targets: &[ClaimTarget]) -> Result<RawClaim, Fatal> {
    let mut out = RawClaim::new();
    for (index, target) in targets.iter().enumerate() {
        let count = target.count;
        let device = &target.device;
        let (u, d, a) = (
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        let mut q = t.queue((u, d, a))?;
        let (_, head, end) = q;
        if head < end {
            let n = u64::from(count).min(end - head);
            let mut next = head;
            for row in t.keys.range((u, d, a, head)..(u, d, a, head + n))? {
                let (k, v) = row?;
                let (_, key_id, digest, json) = v.value();
                if k.value().3 != next {
                    break;
                }
                next += 1;
                out.push(RawClaimedKey {
                    target: index,
                    key_id: key_id.to_owned(),
                    key_json: json.to_owned(),
                    digest: digest.to_vec(),
                    fallback: false,
                });
            }
            if next != head + n {
                return Err(Fatal::Other(Error::corrupt(format!(
                    "one-time key at position {next} of {device} is missing from its queue"
                ))));
            }
            q.1 = next;
            t.set_queue((u, d, a), q)?;
            out.changed(index);
            continue;
        }
        let fallback = t.fallbacks.get((u, d, a))?.map(|v| {
            let (id, json, used, digest) = v.value();
            (id.to_owned(), json.to_owned(), used, digest)
        });
        if let Some((key_id, json, used, digest)) = fallback {
            if !used {
                t.fallbacks
                    .insert((u, d, a), (key_id.as_str(), json.as_str(), true, digest))?;
                out.changed(index);
            }
            out.push(RawClaimedKey {
                target: index,
                key_id,
                key_json: json,
                digest: digest.to_vec(),
                fallback: true,
            });
        }
    }
    Ok(out)
}
