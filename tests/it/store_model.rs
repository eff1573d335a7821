//! Property test: random sequences of appends (with and without client ids, including
//! duplicates), reopens, reads and id lookups, on logs with tiny segments, always agree
//! with a plain in-memory list of events.

use bus::store::{Log, StoreError};
use proptest::prelude::*;
use serde_json::json;

use crate::common::*;

#[derive(Debug, Clone)]
enum Op {
    /// Events of one batch: (client id number, if any; payload).
    Append(Vec<(Option<u8>, u32)>),
    Reopen,
    Read {
        from: prop::sample::Index,
        max: usize,
    },
    Find(prop::sample::Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec((prop::option::weighted(0.3, 0u8..24), any::<u32>()), 1..5)
            .prop_map(Op::Append),
        1 => Just(Op::Reopen),
        3 => (any::<prop::sample::Index>(), 1usize..12).prop_map(|(from, max)| Op::Read { from, max }),
        2 => any::<prop::sample::Index>().prop_map(Op::Find),
    ]
}

struct ModelEvent {
    id: String,
    payload: u32,
}

fn check_read(log: &Log, model: &[ModelEvent], from: usize, max: usize) {
    let got = log.read_blocking(from as u64, max).unwrap();
    let expected = &model[from.min(model.len())..(from + max).min(model.len())];
    // A read may return fewer than asked (a segment boundary), never more or other events.
    assert!(got.len() <= expected.len());
    assert!(
        !got.is_empty() || expected.is_empty(),
        "empty read at {from}"
    );
    for (event, (k, want)) in got.iter().zip(expected.iter().enumerate()) {
        assert_eq!(event.position(), (from + k) as u64);
        assert_eq!(event.id(), want.id);
        assert_eq!(json(event)["payload"], want.payload);
    }
}

fn run(segment_size: u64, ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut log = Some(open(data.path(), segment_size));
    let mut model: Vec<ModelEvent> = Vec::new();
    for op in ops {
        let current = log.as_ref().unwrap();
        match op {
            Op::Append(batch) => {
                let ids: Vec<Option<String>> = batch
                    .iter()
                    .map(|(n, _)| n.map(|n| format!("e_c{n}")))
                    .collect();
                let events = batch
                    .iter()
                    .zip(&ids)
                    .map(|((_, payload), id)| match id {
                        Some(id) => event_with_id(id, &json!(payload)),
                        None => event(&json!(payload)),
                    })
                    .collect();
                let mut seen = std::collections::HashSet::new();
                let duplicate = ids
                    .iter()
                    .flatten()
                    .any(|id| !seen.insert(id.clone()) || model.iter().any(|m| &m.id == id));
                let result = runtime.block_on(current.append(events));
                if duplicate {
                    assert!(
                        matches!(result, Err(StoreError::DuplicateId(_))),
                        "{result:?}"
                    );
                } else {
                    let appended = result.unwrap();
                    for ((a, id), (_, payload)) in appended.iter().zip(&ids).zip(&batch) {
                        assert_eq!(a.position, model.len() as u64);
                        if let Some(id) = id {
                            assert_eq!(&a.id, id);
                        }
                        model.push(ModelEvent {
                            id: a.id.clone(),
                            payload: *payload,
                        });
                    }
                }
                assert_eq!(current.committed(), model.len() as u64);
            }
            Op::Reopen => {
                runtime.block_on(current.close()).unwrap();
                drop(log.take());
                let reopened = open(data.path(), segment_size);
                assert_eq!(reopened.committed(), model.len() as u64);
                assert_eq!(reopened.recovery().truncated, None);
                log = Some(reopened);
            }
            Op::Read { from, max } => {
                let from = from.index(model.len() + 1);
                check_read(current, &model, from, max);
            }
            Op::Find(which) => {
                if !model.is_empty() {
                    let i = which.index(model.len());
                    let found = runtime.block_on(current.find_id(&model[i].id)).unwrap();
                    assert_eq!(found, Some(i as u64));
                }
                let missing = runtime.block_on(current.find_id("e_never")).unwrap();
                assert_eq!(missing, None);
            }
        }
    }
    let log = log.unwrap();
    let all = read_all(&log, 5);
    assert_eq!(all.len(), model.len());
    for (event, want) in all.iter().zip(&model) {
        assert_eq!(event.id(), want.id);
        assert_eq!(json(event)["payload"], want.payload);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_agrees_with_a_list(segment_size in 64u64..1500, ops in prop::collection::vec(op(), 1..40)) {
        run(segment_size, ops);
    }
}
