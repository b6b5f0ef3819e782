//! Deleting a device (R7.1) or a user (R7.2): one range per table.

use std::collections::BTreeSet;

use keyclaim::{Changes, Device, UserId};

use super::{WriteTables, remove_range};
use crate::error::Fatal;
use crate::schema::succ;
use keyclaim::backend::decode;

/// Removes every row of one device from every table; returns whether it had
/// any (R7.1).
pub(super) fn delete_device_rows(t: &mut WriteTables<'_>, u: &str, d: &str) -> Result<bool, Fatal> {
    let hi = succ(d);
    let hi = hi.as_str();
    let mut n = 0;
    n += remove_range(&mut t.queue, (u, d, ""), (u, hi, ""), |_| {}, |_, _| {})?;
    n += remove_range(
        &mut t.keys,
        (u, d, "", 0),
        (u, hi, "", 0),
        |_| {},
        |_, _| {},
    )?;
    n += remove_range(&mut t.ids, (u, d, "", 0), (u, hi, "", 0), |_| {}, |_, _| {})?;
    n += remove_range(&mut t.fallbacks, (u, d, ""), (u, hi, ""), |_| {}, |_, _| {})?;
    Ok(n > 0)
}

/// Deletes one device (R7.1).
pub(crate) fn delete_device(t: &mut WriteTables<'_>, device: &Device) -> Result<Changes, Fatal> {
    let had = delete_device_rows(t, device.user_id.as_str(), device.device_id.as_str())?;
    Ok(if had {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    })
}

/// Deletes every device of a user (R7.2): one range per table.
pub(crate) fn delete_user(t: &mut WriteTables<'_>, user: &UserId) -> Result<Changes, Fatal> {
    let u = user.as_str();
    let hi = succ(u);
    let hi = hi.as_str();
    let mut devices: BTreeSet<String> = BTreeSet::new();
    let mut note = |d: &str| {
        if !devices.contains(d) {
            devices.insert(d.to_owned());
        }
    };
    // Every device with state has a row in `otk_queue` or `fallbacks`.
    remove_range(
        &mut t.queue,
        (u, "", ""),
        (hi, "", ""),
        |k| note(k.1),
        |_, _| {},
    )?;
    remove_range(
        &mut t.fallbacks,
        (u, "", ""),
        (hi, "", ""),
        |k| note(k.1),
        |_, _| {},
    )?;
    remove_range(
        &mut t.keys,
        (u, "", "", 0),
        (hi, "", "", 0),
        |_| {},
        |_, _| {},
    )?;
    remove_range(
        &mut t.ids,
        (u, "", "", 0),
        (hi, "", "", 0),
        |_| {},
        |_, _| {},
    )?;
    let mut out = Vec::with_capacity(devices.len());
    for d in devices {
        out.push(Device::new(
            user.clone(),
            decode::device_id(d).map_err(Fatal::Other)?,
        ));
    }
    Ok(Changes::from_devices(out))
}
