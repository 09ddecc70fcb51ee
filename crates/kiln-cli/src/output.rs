//! Output helpers: JSON with --json, aligned tables otherwise.

use crate::Cli;

pub fn print_json_or(cli: &Cli, v: &serde_json::Value, human: impl FnOnce()) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        human();
    }
}

/// Prints rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Prints a JSON array as a table, one row per element.
pub fn table_of(
    headers: &[&str],
    list: &serde_json::Value,
    row: impl Fn(&serde_json::Value) -> Vec<String>,
) {
    let rows: Vec<Vec<String>> = list.as_array().into_iter().flatten().map(row).collect();
    table(headers, &rows);
}

/// Prints `key: value` lines for the given fields of a JSON object (strings bare, others as JSON).
pub fn fields(v: &serde_json::Value, keys: &[&str], width: usize) {
    for key in keys {
        let value = &v[*key];
        let text = value
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        println!("{:<width$} {text}", format!("{key}:"));
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Asks for confirmation on a terminal; `assume_yes` (from `-y`) skips the question.
pub fn confirm(question: &str, assume_yes: bool) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if assume_yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question}: refusing without confirmation; pass -y to confirm");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_are_human() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(1 << 30), "1.0 GiB");
    }
}
