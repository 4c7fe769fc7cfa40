//! Reading the proxy's `/metrics` (OpenMetrics text) the way the tests ask
//! about it: one series by its name and some of its labels. The proxy orders
//! a series' labels as its label type declares them, so a test names only
//! the labels it cares about, in any order, and is not broken by a label
//! added later.

/// The sum of the values of the series called `name` whose labels include
/// every pair of `labels`; `None` when the text has no such series (a labelled
/// series appears only once something has been counted under it).
///
/// `name` is the whole series name as printed: `…_total` for a counter,
/// `…_count` or `…_bucket` for a histogram's parts.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, rest)) = split_series(line) else {
            continue;
        };
        if series.name != name
            || !labels
                .iter()
                .all(|(k, v)| series.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        {
            continue;
        }
        let number = rest.split_whitespace().next().unwrap_or_default();
        let number: f64 = number
            .parse()
            .unwrap_or_else(|_| panic!("no value in the metrics line {line:?}"));
        *sum.get_or_insert(0.0) += number;
    }
    sum
}

/// One series of an exposition line: its name and its labels, unescaped.
struct Series<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
}

/// Splits `name{k="v",…} value…` into the series and what follows it.
fn split_series(line: &str) -> Option<(Series<'_>, &str)> {
    let end_of_name = line.find(['{', ' '])?;
    let name = &line[..end_of_name];
    let mut rest = &line[end_of_name..];
    let mut labels = Vec::new();
    if let Some(mut inside) = rest.strip_prefix('{') {
        loop {
            inside = inside.strip_prefix(',').unwrap_or(inside);
            if let Some(after) = inside.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inside.split_once("=\"")?;
            let (value, after) = quoted_value(after)?;
            labels.push((key, value));
            inside = after;
        }
    }
    Some((Series { name, labels }, rest.trim_start()))
}

/// A label value up to its closing quote, with `\"`, `\\` and `\n` unescaped.
fn quoted_value(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}
