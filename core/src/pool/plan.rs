//! The warm-pool converger's planner: from what a pool should have and what it has, the
//! backends one pass starts and stops.
//!
//! A pure function, so every decider looking at the same state makes the same plan, and the
//! rules are table-tested without a runtime. A pass moves by a bounded, asymmetric step
//! ([`Bounds`]): a missing warm backend makes a user wait, a spare one only costs a little,
//! so passes add quickly and remove slowly. After failed starts, slow start limits the
//! additions further (1, 2, 4, then the bound) so a broken template does not start a burst
//! of backends that will all fail.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::Bounds;
use crate::UnixMillis;

/// One unclaimed (warm) live member of a pool as the converger sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// The pool generation whose template it runs.
    pub generation: u64,
    /// Whether it answers (a not-ready one is still starting).
    pub ready: bool,
    pub created_at: UnixMillis,
}

/// What the pool should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Warm backends wanted per generation (from `Pool::warm_targets`); generations absent
    /// here are to be replaced.
    pub targets: BTreeMap<u64, u32>,
    /// At most this many live backends in the pool, warm and claimed (None: no limit).
    pub max_live: Option<u32>,
    /// Claimed (live, keyed) backends of the pool, which count against max_live.
    pub claimed: u32,
}

/// What one pass does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Backends to start, one entry per backend, naming its generation.
    pub add: Vec<u64>,
    /// Members to stop, in removal order.
    pub remove: Vec<String>,
}

/// Plans one pass: starts backends for the generations under their target, and stops old
/// generations' members and the excess of the others, within `bounds` and the slow-start
/// step (None: the full bound).
pub fn plan(
    desired: &Desired,
    observed: &[Member],
    bounds: Bounds,
    slow_start: Option<u32>,
) -> Plan {
    Plan {
        add: additions(desired, observed, bounds, slow_start),
        remove: removals(&desired.targets, observed, bounds.max_remove),
    }
}

/// The generations to start backends of. Ready and starting members count alike: a starting
/// backend will be ready soon, and counting only ready ones would start it again every pass.
fn additions(
    desired: &Desired,
    observed: &[Member],
    bounds: Bounds,
    slow_start: Option<u32>,
) -> Vec<u64> {
    let mut allowed = bounds.max_add.min(slow_start.unwrap_or(u32::MAX));
    if let Some(max_live) = desired.max_live {
        let live = u32::try_from(observed.len()).unwrap_or(u32::MAX);
        allowed = allowed.min(
            max_live
                .saturating_sub(desired.claimed)
                .saturating_sub(live),
        );
    }
    let mut deficits: BTreeMap<u64, u32> = desired
        .targets
        .iter()
        .map(|(&g, &target)| (g, target.saturating_sub(count(observed, g))))
        .collect();
    let mut add = Vec::new();
    // One at a time to the largest deficit, so a short budget is shared fairly; ties go to
    // the higher generation, which is the rollout's.
    while add.len() < allowed as usize {
        let Some((&g, _)) = deficits
            .iter()
            .filter(|(_, d)| **d > 0)
            .max_by(|(ga, da), (gb, db)| da.cmp(db).then(ga.cmp(gb)))
        else {
            break;
        };
        *deficits.get_mut(&g).unwrap() -= 1;
        add.push(g);
    }
    // Grouped, newest generation first, so the plan reads the same however it was shared.
    add.sort_unstable_by(|a, b| b.cmp(a));
    add
}

/// The members to stop, in removal order, at most `max_remove`.
fn removals(targets: &BTreeMap<u64, u32>, observed: &[Member], max_remove: u32) -> Vec<String> {
    let mut candidates: Vec<&Member> = Vec::new();
    // Old generations: every member is to be replaced (the ready ones only while capacity
    // allows, checked below).
    candidates.extend(
        observed
            .iter()
            .filter(|m| !targets.contains_key(&m.generation)),
    );
    // Current generations: the excess over the target, the members first in removal order.
    for (&g, &target) in targets {
        let mut members: Vec<&Member> = observed.iter().filter(|m| m.generation == g).collect();
        let excess = members.len().saturating_sub(target as usize);
        members.sort_by(|a, b| removal_order(a, b, targets));
        candidates.extend(members.into_iter().take(excess));
    }
    candidates.sort_by(|a, b| removal_order(a, b, targets));

    let wanted: u64 = targets.values().map(|&t| u64::from(t)).sum();
    let mut ready = observed.iter().filter(|m| m.ready).count() as u64;
    let mut remove = Vec::new();
    for m in candidates {
        if remove.len() >= max_remove as usize {
            break;
        }
        if m.ready {
            // An old generation's ready member goes only once the others carry the target:
            // a rollout never lowers ready capacity under it. (Excess is above it by
            // definition, so it may go whether ready or not.)
            let old = !targets.contains_key(&m.generation);
            if old && ready < wanted + 1 {
                continue;
            }
            ready -= 1;
        }
        remove.push(m.id.clone());
    }
    remove
}

/// Members of generation `g`.
fn count(observed: &[Member], g: u64) -> u32 {
    let n = observed.iter().filter(|m| m.generation == g).count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The slow-start step after a pass: `failed` = some start failed since the last pass,
/// `succeeded` = some start became ready and none failed. After a failure the step is 1; each
/// pass with a success doubles it (1, 2, 4, ...); once it reaches `bounds.max_add` it is None
/// (the full bound). With neither, it stays.
pub fn next_slow_start(
    step: Option<u32>,
    failed: bool,
    succeeded: bool,
    bounds: Bounds,
) -> Option<u32> {
    if failed {
        return Some(1);
    }
    match step {
        Some(s) if succeeded => {
            let next = s.saturating_mul(2);
            (next < bounds.max_add).then_some(next)
        }
        _ => step,
    }
}

/// The removal order, a total order over members: old generations (absent from `targets`)
/// first, then not-ready before ready (a starting backend has served no one yet), then oldest
/// first, then by id. Exposed so the executor and tests can sort with it. The generation
/// breaks the last tie, so only identical members compare equal.
pub fn removal_order(a: &Member, b: &Member, targets: &BTreeMap<u64, u32>) -> Ordering {
    let current = |m: &Member| targets.contains_key(&m.generation);
    current(a)
        .cmp(&current(b))
        .then(a.ready.cmp(&b.ready))
        .then(a.created_at.cmp(&b.created_at))
        .then_with(|| a.id.cmp(&b.id))
        .then(a.generation.cmp(&b.generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        max_add: 7,
        max_remove: 1,
    };

    fn m(id: &str, generation: u64, ready: bool, created_at: UnixMillis) -> Member {
        Member {
            id: id.into(),
            generation,
            ready,
            created_at,
        }
    }

    fn desired(targets: &[(u64, u32)]) -> Desired {
        Desired {
            targets: targets.iter().copied().collect(),
            max_live: None,
            claimed: 0,
        }
    }

    /// `n` ready members of `generation`, created at 1..=n, ids `{prefix}{i}`.
    fn ready_members(prefix: &str, generation: u64, n: u64) -> Vec<Member> {
        (1..=n)
            .map(|i| m(&format!("{prefix}{i}"), generation, true, i))
            .collect()
    }

    /// Plans, and checks what holds for every plan: the bounds, and never adding to a
    /// generation while removing its excess.
    fn checked_plan(
        d: &Desired,
        observed: &[Member],
        bounds: Bounds,
        slow_start: Option<u32>,
    ) -> Plan {
        let p = plan(d, observed, bounds, slow_start);
        assert!(p.add.len() <= bounds.max_add as usize, "{p:?}");
        assert!(p.remove.len() <= bounds.max_remove as usize, "{p:?}");
        for id in &p.remove {
            let g = observed.iter().find(|m| &m.id == id).unwrap().generation;
            assert!(
                !p.add.contains(&g),
                "adds to and removes from generation {g}: {p:?}"
            );
        }
        p
    }

    /// Applies a plan's removals to the member list.
    fn apply_removals(observed: &mut Vec<Member>, p: &Plan) {
        observed.retain(|m| !p.remove.contains(&m.id));
    }

    #[test]
    fn an_empty_pool_gets_its_target() {
        let p = checked_plan(&desired(&[(1, 5)]), &[], BOUNDS, None);
        assert_eq!(
            p,
            Plan {
                add: vec![1; 5],
                remove: vec![]
            }
        );
    }

    #[test]
    fn additions_are_bounded_per_pass() {
        let p = checked_plan(&desired(&[(1, 20)]), &[], BOUNDS, None);
        assert_eq!(p.add, vec![1; 7]);
    }

    #[test]
    fn max_live_limits_additions() {
        let d = Desired {
            max_live: Some(6),
            claimed: 4,
            ..desired(&[(1, 5)])
        };
        let p = checked_plan(&d, &[m("a", 1, true, 1)], BOUNDS, None);
        assert_eq!(p.add, vec![1]);
        // A pool at its limit (or above it) adds nothing.
        let full = Desired { claimed: 6, ..d };
        assert!(
            checked_plan(&full, &[m("a", 1, true, 1)], BOUNDS, None)
                .add
                .is_empty()
        );
    }

    #[test]
    fn lowering_the_target_removes_one_per_pass_not_ready_then_oldest() {
        let d = desired(&[(1, 1)]);
        let mut observed = vec![
            m("a", 1, true, 1),
            m("b", 1, false, 2),
            m("c", 1, true, 3),
            m("d", 1, false, 4),
            m("e", 1, true, 5),
        ];
        let mut removed = Vec::new();
        for _ in 0..4 {
            let p = checked_plan(&d, &observed, BOUNDS, None);
            assert!(p.add.is_empty());
            assert_eq!(p.remove.len(), 1, "the bound holds downward: {p:?}");
            apply_removals(&mut observed, &p);
            removed.extend(p.remove);
        }
        assert_eq!(removed, ["b", "d", "a", "c"]);
        assert_eq!(observed, [m("e", 1, true, 5)]);
        assert_eq!(checked_plan(&d, &observed, BOUNDS, None), Plan::default());
    }

    fn varied_members() -> Vec<Member> {
        vec![
            m("a", 1, true, 10),
            m("b", 2, true, 10),
            m("c", 2, true, 10),
            m("d", 2, false, 10),
            m("e", 1, false, 30),
            m("f", 2, true, 5),
            m("g", 1, true, 5),
            m("h", 3, true, 5),
        ]
    }

    #[test]
    fn removal_order_is_total() {
        let targets = BTreeMap::from([(2, 1), (3, 1)]);
        let mut members = varied_members();
        // The same id in another generation: only the generation tells them apart.
        members.push(m("h", 2, true, 5));
        for a in &members {
            for b in &members {
                let ab = removal_order(a, b, &targets);
                assert_eq!(ab, removal_order(b, a, &targets).reverse(), "{a:?} {b:?}");
                assert_eq!(ab == Ordering::Equal, a == b, "{a:?} {b:?}");
            }
        }
        let sorted = |mut v: Vec<Member>| {
            v.sort_by(|a, b| removal_order(a, b, &targets));
            v
        };
        let expected = sorted(members.clone());
        let ids: Vec<(&str, u64)> = expected
            .iter()
            .map(|m| (m.id.as_str(), m.generation))
            .collect();
        assert_eq!(
            ids,
            [
                ("e", 1),
                ("g", 1),
                ("a", 1),
                ("d", 2),
                ("f", 2),
                ("h", 2),
                ("h", 3),
                ("b", 2),
                ("c", 2)
            ]
        );
        assert_eq!(sorted(members.iter().rev().cloned().collect()), expected);
        let permutation = [5, 2, 8, 7, 0, 3, 6, 1, 4];
        assert_eq!(
            sorted(permutation.iter().map(|&i| members[i].clone()).collect()),
            expected
        );
    }

    #[test]
    fn equal_members_are_ordered_by_id() {
        let targets = BTreeMap::from([(1, 0)]);
        let members = vec![m("c", 1, true, 7), m("a", 1, true, 7), m("b", 1, true, 7)];
        let p = checked_plan(
            &Desired {
                targets,
                max_live: None,
                claimed: 0,
            },
            &members,
            Bounds {
                max_add: 7,
                max_remove: 3,
            },
            None,
        );
        assert_eq!(p.remove, ["a", "b", "c"]);
    }

    #[test]
    fn two_planners_with_the_same_view_choose_the_same_victims() {
        let d = desired(&[(2, 2), (3, 3)]);
        let bounds = Bounds {
            max_add: 7,
            max_remove: 4,
        };
        let mut observed = varied_members();
        let p = checked_plan(&d, &observed, bounds, None);
        observed.reverse();
        assert_eq!(checked_plan(&d, &observed, bounds, None), p);
        // 6 ready for a target of 5: one old ready member may go ("g", the older), so "a" is
        // skipped; then generation 2's excess.
        assert_eq!(
            p,
            Plan {
                add: vec![3, 3],
                remove: vec!["e".into(), "g".into(), "d".into(), "f".into()]
            }
        );
    }

    #[test]
    fn a_pass_after_a_partial_failure_corrects_it() {
        let d = desired(&[(1, 5)]);
        assert_eq!(checked_plan(&d, &[], BOUNDS, None).add, vec![1; 5]);
        // Only 2 of the 5 were created (the others failed); the next pass starts the rest.
        let observed = [m("a", 1, false, 1), m("b", 1, true, 2)];
        assert_eq!(
            checked_plan(&d, &observed, BOUNDS, None),
            Plan {
                add: vec![1; 3],
                remove: vec![]
            }
        );
    }

    #[test]
    fn slow_start_doubles_after_a_failure_up_to_the_bound() {
        assert_eq!(next_slow_start(None, true, false, BOUNDS), Some(1));
        assert_eq!(next_slow_start(Some(1), false, true, BOUNDS), Some(2));
        assert_eq!(next_slow_start(Some(2), false, true, BOUNDS), Some(4));
        // 8 reaches the bound of 7: the full bound again.
        assert_eq!(next_slow_start(Some(4), false, true, BOUNDS), None);
        assert_eq!(next_slow_start(None, false, true, BOUNDS), None);
        // A failure at any point starts over.
        for step in [None, Some(1), Some(2), Some(4)] {
            assert_eq!(next_slow_start(step, true, false, BOUNDS), Some(1));
            assert_eq!(next_slow_start(step, true, true, BOUNDS), Some(1));
            // Neither: the step stays.
            assert_eq!(next_slow_start(step, false, false, BOUNDS), step);
        }
    }

    #[test]
    fn slow_start_limits_additions() {
        let d = desired(&[(1, 5)]);
        assert_eq!(checked_plan(&d, &[], BOUNDS, Some(1)).add, vec![1]);
        assert_eq!(checked_plan(&d, &[], BOUNDS, Some(4)).add, vec![1; 4]);
    }

    #[test]
    fn a_rollout_replaces_old_ready_members_only_once_new_ones_are_ready() {
        let d = desired(&[(2, 5)]);
        let old = ready_members("old", 1, 5);
        // Nothing of generation 2 is ready: removing an old member would drop ready below 5.
        let p = checked_plan(&d, &old, BOUNDS, None);
        assert_eq!(
            p,
            Plan {
                add: vec![2; 5],
                remove: vec![]
            }
        );

        // 3 of generation 2 are ready (8 ready in all): the oldest old member goes.
        let mut observed = old.clone();
        observed.extend((1..=5).map(|i| m(&format!("new{i}"), 2, i <= 3, 100 + i)));
        let p = checked_plan(&d, &observed, BOUNDS, None);
        assert_eq!(
            p,
            Plan {
                add: vec![],
                remove: vec!["old1".into()]
            }
        );
        // With a larger bound, exactly the 3 spare ready ones go, oldest first.
        let wide = Bounds {
            max_add: 7,
            max_remove: 5,
        };
        assert_eq!(
            checked_plan(&d, &observed, wide, None).remove,
            ["old1", "old2", "old3"]
        );
    }

    #[test]
    fn a_rollout_removes_old_not_ready_members_first() {
        let d = desired(&[(2, 5)]);
        let mut observed = ready_members("old", 1, 4);
        observed.push(m("old-starting", 1, false, 50));
        // Even with no ready capacity to spare, a starting old member may go.
        let p = checked_plan(&d, &observed, BOUNDS, None);
        assert_eq!(p.remove, ["old-starting"]);
        assert_eq!(p.add, vec![2; 5]);
    }

    #[test]
    fn a_target_of_zero_makes_every_member_excess() {
        // Unlike an absent generation, a target of 0 is excess: removable even when ready,
        // without waiting for the new generation.
        let d = desired(&[(1, 0), (2, 5)]);
        let p = checked_plan(&d, &ready_members("old", 1, 5), BOUNDS, None);
        assert_eq!(
            p,
            Plan {
                add: vec![2; 5],
                remove: vec!["old1".into()]
            }
        );
    }

    #[test]
    fn a_canary_split_adds_the_canary_and_trims_the_stable_excess() {
        let d = desired(&[(1, 4), (2, 1)]);
        let p = checked_plan(&d, &ready_members("s", 1, 5), BOUNDS, None);
        // Generation 1 has 5 for a target of 4: its oldest is excess and goes at once, while
        // the canary starts.
        assert_eq!(
            p,
            Plan {
                add: vec![2],
                remove: vec!["s1".into()]
            }
        );
        // Once trimmed and the canary is up, the pool is converged.
        let mut observed = ready_members("s", 1, 5);
        apply_removals(&mut observed, &p);
        observed.push(m("c1", 2, true, 100));
        assert_eq!(checked_plan(&d, &observed, BOUNDS, None), Plan::default());
    }

    #[test]
    fn additions_go_to_the_largest_deficit_ties_to_the_newer_generation() {
        let d = desired(&[(1, 3), (2, 3)]);
        assert_eq!(checked_plan(&d, &[], BOUNDS, Some(4)).add, vec![2, 2, 1, 1]);
        assert_eq!(checked_plan(&d, &[], BOUNDS, Some(3)).add, vec![2, 2, 1]);
        let observed = ready_members("a", 2, 2);
        assert_eq!(checked_plan(&d, &observed, BOUNDS, Some(2)).add, vec![1, 1]);
    }
}
