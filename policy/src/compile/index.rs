//! The label index of a namespace's pods, and the pods a selector can match by it: lets a
//! peer selector look only at the pods that can match it instead of at every pod.

use std::collections::HashMap;

use crate::model::{LabelSelector, Operator, Pod};

/// The pods of a namespace by label: key -> (the pods that have it, value -> the pods
/// with that value). Lets a selector look only at the pods that can match it.
pub(super) type LabelIndex<'a> = HashMap<&'a str, (Vec<usize>, HashMap<&'a str, Vec<usize>>)>;

/// The label index of the pods `members` (indices into `pods`: one namespace's pods).
pub(super) fn label_index<'a>(pods: &[&'a Pod], members: &[usize]) -> LabelIndex<'a> {
    let mut index: LabelIndex<'a> = HashMap::new();
    for &i in members {
        for (k, v) in &pods[i].labels {
            let (with_key, by_value) = index.entry(k.as_str()).or_default();
            with_key.push(i);
            by_value.entry(v.as_str()).or_default().push(i);
        }
    }
    index
}

/// The pods of a namespace that `sel` can match, as lists of indices: those with one of its
/// matchLabels pairs, with one of the values of an `In`, or with the key of an `Exists`,
/// whichever are fewest. None: `sel` has no such requirement (any pod can match).
pub(super) fn candidates<'i>(
    index: &'i LabelIndex,
    sel: &LabelSelector,
) -> Option<Vec<&'i [usize]>> {
    let mut best: Option<(usize, Vec<&'i [usize]>)> = None;
    let mut consider = |lists: Vec<&'i [usize]>| {
        let n = lists.iter().map(|l| l.len()).sum();
        if best.as_ref().is_none_or(|(m, _)| n < *m) {
            best = Some((n, lists));
        }
    };
    for (k, v) in &sel.match_labels {
        let list = index.get(k.as_str()).and_then(|(_, by)| by.get(v.as_str()));
        consider(list.map(Vec::as_slice).into_iter().collect());
    }
    for r in &sel.match_expressions {
        let Some((with_key, by_value)) = index.get(r.key.as_str()) else {
            if matches!(r.operator, Operator::In | Operator::Exists) {
                consider(vec![]);
            }
            continue;
        };
        match r.operator {
            Operator::Exists => consider(vec![with_key]),
            // A pod has one value per key, so the lists do not overlap. Not worth more
            // lookups than there are pods with the key.
            Operator::In if r.values.len() <= with_key.len() => consider(
                r.values
                    .iter()
                    .filter_map(|v| by_value.get(v.as_str()).map(Vec::as_slice))
                    .collect(),
            ),
            _ => {}
        }
    }
    best.map(|(_, lists)| lists)
}
