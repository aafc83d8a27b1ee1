//! The dictionary-encoded column answers exactly as the plain column does.

use tailgate_plugin_sdk::testing::TraceBuilder;
use tailgate_plugin_sdk::{AttrValue, DictColumn};

#[test]
fn a_dictionary_column_decodes_to_the_plain_column() {
    let mut b = TraceBuilder::new();
    for (i, tenant) in ["t1", "t2", "t1", "", "t2"].iter().enumerate() {
        b = b.span(format!("s{i}"));
        if !tenant.is_empty() {
            b = b.attr("tenant", *tenant);
        }
        // Same text, another type: a value of its own.
        if i == 4 {
            b = b.attr("mixed", "7");
        } else {
            b = b.attr("mixed", 7i64);
        }
    }
    let t = b.build();

    let tenants = t.attr_column_dict("tenant");
    assert_eq!(
        tenants.values(),
        [AttrValue::Str("t1".into()), AttrValue::Str("t2".into())]
    );
    assert_eq!(tenants.codes(), [0, 1, 0, DictColumn::NO_VALUE, 1]);
    let mixed = t.attr_column_dict("mixed");
    assert_eq!(mixed.values().len(), 2);
    for key in ["tenant", "mixed", "absent"] {
        let plain = t.attr_column(key);
        let dict = t.attr_column_dict(key);
        assert_eq!(dict.len(), plain.len(), "{key}");
        for (i, v) in plain.iter().enumerate() {
            assert_eq!(dict.get(i as u32), v.as_ref(), "{key}, span {i}");
        }
    }
    assert!(t.attr_column_dict("absent").values().is_empty());
}
