//! The command line as `--help` shows it.

use clap::CommandFactory;

use tracing::level_filters::LevelFilter;

use super::{parse_log_filter, Cli};

/// Every subcommand, however deep, with the path that names it (`bus bench idle`).
fn commands() -> Vec<(String, clap::Command)> {
    let mut found = Vec::new();
    let mut todo = vec![("bus".to_owned(), Cli::command())];
    while let Some((path, command)) = todo.pop() {
        for sub in command.get_subcommands() {
            todo.push((format!("{path} {}", sub.get_name()), sub.clone()));
        }
        found.push((path, command));
    }
    found
}

#[test]
fn every_flag_and_argument_says_what_it_is_for() {
    let mut silent = Vec::new();
    for (path, command) in commands() {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                silent.push(format!("{path} {id}"));
            }
        }
    }
    assert!(silent.is_empty(), "without help text: {silent:#?}");
}

#[test]
fn every_command_that_does_something_shows_an_example() {
    let missing: Vec<String> = commands()
        .into_iter()
        // `bus` itself, and groups whose subcommands have their own.
        .filter(|(_, command)| !command.has_subcommands())
        .filter(|(_, command)| {
            let after = command.get_after_help().map(|h| h.to_string());
            !after.is_some_and(|h| h.contains("Example"))
        })
        .map(|(path, _)| path)
        .collect();
    assert!(missing.is_empty(), "no example in --help: {missing:#?}");
}

#[test]
fn put_takes_its_subject_and_data_as_arguments_or_flags() {
    use clap::Parser;
    let parse = |args: &[&str]| Cli::try_parse_from(["bus", "put"].iter().chain(args));
    for args in [
        &["orders.created", "{}"][..],
        &["orders.created"],
        &["--subject", "orders.created", "--data", "{}"],
        &["--subject", "orders.created"],
    ] {
        assert!(parse(args).is_ok(), "{args:?}");
    }
    for args in [
        &[][..],
        &["orders.created", "--subject", "orders.paid"],
        &["orders.created", "{}", "--data", "{}"],
    ] {
        assert!(parse(args).is_err(), "{args:?}");
    }
}

#[test]
fn the_examples_in_help_are_valid_command_lines() {
    use clap::Parser;
    let mut checked = 0;
    for (path, command) in commands() {
        let Some(after) = command.get_after_help().map(|h| h.to_string()) else {
            continue;
        };
        // A line ending in a backslash goes on on the next, as in a shell.
        let joined = after.replace("\\\n", " ");
        for line in joined
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("bus "))
        {
            // Shell quoting as the examples use it: whole words in '…' or "…".
            let words: Vec<String> = line
                .split_whitespace()
                .map(|w| w.trim_matches(|c| c == '\'' || c == '"').to_owned())
                .take_while(|w| w != ">")
                .collect();
            if let Err(e) = Cli::try_parse_from(&words) {
                panic!("{path}: the example `{line}` does not parse: {e}");
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} examples");
}

fn levels(text: &str) -> Vec<(String, LevelFilter)> {
    let filter = parse_log_filter(text).unwrap().0;
    let mut levels: Vec<_> = filter.iter().map(|(t, l)| (t.to_owned(), l)).collect();
    levels.extend(filter.default_level().map(|l| (String::new(), l)));
    levels.sort();
    levels
}

#[test]
fn log_levels_are_read_as_rust_log_writes_them() {
    assert_eq!(levels(""), [(String::new(), LevelFilter::INFO)]);
    assert_eq!(levels("DEBUG"), [(String::new(), LevelFilter::DEBUG)]);
    assert_eq!(levels(" Warning "), [(String::new(), LevelFilter::WARN)]);
    assert_eq!(
        levels("warn, bus::http=DEBUG,bus::access=off"),
        [
            (String::new(), LevelFilter::WARN),
            ("bus::access".to_owned(), LevelFilter::OFF),
            ("bus::http".to_owned(), LevelFilter::DEBUG),
        ]
    );
    for bad in ["LOUD", "bus=loud", "=info", "bus::http"] {
        let refused = parse_log_filter(bad).unwrap_err();
        assert!(refused.contains("BUS_LOG_LEVEL"), "{bad}: {refused}");
    }
}
