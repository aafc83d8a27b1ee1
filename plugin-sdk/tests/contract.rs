//! The contract's name and version are read from the WIT's `package` line, so the WIT is the one
//! place they are written; the host and the build step use these constants.

#[test]
fn the_contract_version_is_the_wits_package_line() {
    let line = tailgate_plugin_sdk::WIT
        .lines()
        .find(|l| l.starts_with("package "))
        .expect("a package line");
    assert_eq!(
        line,
        format!(
            "package {}@{};",
            tailgate_plugin_sdk::CONTRACT_PACKAGE,
            tailgate_plugin_sdk::CONTRACT_VERSION
        )
    );
    assert_eq!(tailgate_plugin_sdk::CONTRACT_PACKAGE, "tailgate:policy");
    let parts: Vec<&str> = tailgate_plugin_sdk::CONTRACT_VERSION.split('.').collect();
    assert_eq!(parts.len(), 3, "semver: {parts:?}");
    assert!(parts.iter().all(|p| p.parse::<u32>().is_ok()), "{parts:?}");
}
