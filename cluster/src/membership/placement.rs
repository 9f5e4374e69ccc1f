//! Which member serves which rank.

use std::collections::BTreeMap;

use super::records::MemberRecord;
use crate::Layout;

/// The members of `candidates` that serve each rank of `layout` for `model`, by index
/// into `candidates` in rank order, or `None` if there are too few. Earlier candidates
/// are taken first.
///
/// Ranks are numbered as [`Layout`] numbers them (Megatron's order: the tensor-parallel
/// rank fastest), so each tensor-parallel group is a run of consecutive ranks. A member
/// that already holds a rank's slice of `model` under `layout` keeps that rank, so that
/// it need not load again. The other ranks go one tensor-parallel group at a time to the
/// host with the fewest free members that still fit the whole group (next to the
/// group's members already placed, where that host has room), so that the group's
/// all-reduces stay on one machine wherever the hosts allow it.
pub fn place_ranks(
    layout: &Layout,
    model: &str,
    candidates: &[MemberRecord],
) -> Option<Vec<usize>> {
    let mut ranks: Vec<Option<usize>> = vec![None; layout.world_size()];
    let mut free = Vec::new();
    for (i, candidate) in candidates.iter().enumerate() {
        let keeps = candidate.slice.as_ref().and_then(|s| {
            (s.model == model && s.layout == *layout && s.rank < ranks.len()).then_some(s.rank)
        });
        match keeps {
            Some(rank) if ranks[rank].is_none() => ranks[rank] = Some(i),
            _ => free.push(i),
        }
    }
    // Free members by host, in the candidates' order.
    let mut hosts: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for i in free {
        hosts
            .entry(candidates[i].host.as_str())
            .or_default()
            .push(i);
    }
    for group in ranks.chunks_mut(layout.tp()) {
        let mut needed = group.iter().filter(|r| r.is_none()).count();
        while needed > 0 {
            let placed_on: Vec<&str> = group
                .iter()
                .flatten()
                .map(|&i| candidates[i].host.as_str())
                .collect();
            let host = pick_host(&hosts, &placed_on, needed)?;
            let members = hosts.get_mut(host)?;
            for slot in group.iter_mut().filter(|r| r.is_none()) {
                let Some(i) = members.first().copied() else {
                    break;
                };
                members.remove(0);
                *slot = Some(i);
                needed -= 1;
            }
        }
    }
    ranks.into_iter().collect()
}

/// The host to take `needed` members of one group from: where the group already is if
/// it has room, else the host that fits them with the fewest free members, else the one
/// with the most; `None` when no host has any free member.
fn pick_host<'a>(
    hosts: &BTreeMap<&'a str, Vec<usize>>,
    placed_on: &[&str],
    needed: usize,
) -> Option<&'a str> {
    let free = |h: &&str| hosts.get(*h).map_or(0, Vec::len);
    if let Some(&home) = placed_on.iter().find(|h| free(h) >= needed) {
        return hosts.get_key_value(home).map(|(h, _)| *h);
    }
    let fitting = hosts
        .iter()
        .filter(|(_, m)| m.len() >= needed)
        .min_by_key(|(_, m)| m.len())
        .map(|(h, _)| *h);
    fitting.or_else(|| {
        hosts
            .iter()
            .filter(|(_, m)| !m.is_empty())
            // The most free members; the first host by name among equals.
            .max_by_key(|(h, m)| (m.len(), std::cmp::Reverse(**h)))
            .map(|(h, _)| *h)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{LoadedSlice, MemberState};

    fn member(id: &str, host: &str, slice: Option<(usize, Layout)>) -> MemberRecord {
        MemberRecord {
            id: id.into(),
            host: host.into(),
            address: format!("{host}:1"),
            device: "cpu".into(),
            pid: 1,
            state: MemberState::Idle,
            slice: slice.map(|(rank, layout)| LoadedSlice {
                model: "m".into(),
                layout,
                rank,
                fingerprint: "f".into(),
            }),
        }
    }

    fn hosts_of(members: &[MemberRecord], placed: &[usize]) -> Vec<String> {
        placed.iter().map(|&i| members[i].host.clone()).collect()
    }

    #[test]
    fn each_tensor_parallel_group_stays_on_one_host() {
        // Interleaved registrations: a, b, a, b, ...
        let members: Vec<MemberRecord> = (0..6)
            .map(|i| member(&format!("w{i}"), ["a", "b"][i % 2], None))
            .collect();
        let layout = Layout::new(1, 2, 3).unwrap();
        let placed = place_ranks(&layout, "m", &members).unwrap();
        let hosts = hosts_of(&members, &placed);
        assert_eq!(
            hosts[0..3],
            [hosts[0].clone(), hosts[0].clone(), hosts[0].clone()]
        );
        assert_eq!(
            hosts[3..6],
            [hosts[3].clone(), hosts[3].clone(), hosts[3].clone()]
        );
        assert_ne!(hosts[0], hosts[3]);
    }

    #[test]
    fn a_group_spills_over_hosts_only_when_no_host_fits_it() {
        let members = [member("w0", "a", None), member("w1", "b", None)];
        let layout = Layout::new(1, 1, 2).unwrap();
        let placed = place_ranks(&layout, "m", &members).unwrap();
        assert_eq!(hosts_of(&members, &placed), ["a", "b"]);
    }

    #[test]
    fn a_member_holding_a_rank_keeps_it() {
        let layout = Layout::new(1, 2, 1).unwrap();
        let members = [
            member("w0", "a", Some((1, layout))),
            member("w1", "a", None),
        ];
        let placed = place_ranks(&layout, "m", &members).unwrap();
        assert_eq!(placed, [1, 0]);
        // A slice loaded without FSDP is not one loaded with it.
        let fsdp = Layout::new(2, 1, 1).unwrap();
        let members = [member("w0", "a", Some((1, fsdp))), member("w1", "a", None)];
        let placed = place_ranks(&fsdp.with_fsdp(true).unwrap(), "m", &members).unwrap();
        assert_eq!(placed, [0, 1]);
        // Under another layout the slice is of no use: ranks go in id order.
        let placed = place_ranks(&Layout::new(1, 1, 2).unwrap(), "m", &members).unwrap();
        assert_eq!(placed, [0, 1]);
    }

    #[test]
    fn too_few_members_place_nothing() {
        let members = [member("w0", "a", None)];
        assert_eq!(
            place_ranks(&Layout::new(1, 2, 1).unwrap(), "m", &members),
            None
        );
    }
}
