//! A strict reader of the OpenMetrics text format (the ABNF of OpenMetrics
//! 1.0: descriptors, samples with escaped label values, exemplars, `# EOF`
//! last). `prometheus-parse` skips lines it cannot read, so a scrape that
//! Prometheus would reject can still look fine through it; this refuses
//! the whole text at the first line that breaks the grammar.

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, e.g. `authswap_requests_total`.
    pub name: String,
    /// Labels in order, values unescaped.
    pub labels: Labels,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The unescaped value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn name_char(c: u8, first: bool, colon: bool) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || (colon && c == b':') || (!first && c.is_ascii_digit())
}

/// Reads a metric name (`colon`) or a label name at the start of `s`.
fn take_name(s: &str, colon: bool) -> Result<(&str, &str), String> {
    let b = s.as_bytes();
    let mut n = 0;
    while n < b.len() && name_char(b[n], n == 0, colon) {
        n += 1;
    }
    if n == 0 {
        return Err(format!("expected a name at `{s}`"));
    }
    Ok(s.split_at(n))
}

/// Reads `"escaped-string"` at the start of `s`, returning it unescaped.
fn take_quoted(s: &str) -> Result<(String, &str), String> {
    let rest = s
        .strip_prefix('"')
        .ok_or_else(|| format!("expected '\"' at `{s}`"))?;
    let mut out = String::new();
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &rest[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                other => return Err(format!("bad escape {other:?} in `{s}`")),
            },
            c => out.push(c),
        }
    }
    Err(format!("unterminated string `{s}`"))
}

/// Label names and unescaped values, in order.
pub type Labels = Vec<(String, String)>;

/// Reads `{label="value",...}` at the start of `s`.
fn take_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut rest = s
        .strip_prefix('{')
        .ok_or_else(|| format!("expected '{{' at `{s}`"))?;
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('}') {
        return Ok((labels, r));
    }
    loop {
        let (key, r) = take_name(rest, false)?;
        let r = r
            .strip_prefix('=')
            .ok_or_else(|| format!("expected '=' at `{r}`"))?;
        let (value, r) = take_quoted(r)?;
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} repeated"));
        }
        labels.push((key.to_owned(), value));
        if let Some(r) = r.strip_prefix(',') {
            rest = r;
        } else if let Some(r) = r.strip_prefix('}') {
            return Ok((labels, r));
        } else {
            return Err(format!("expected ',' or '}}' at `{r}`"));
        }
    }
}

fn number(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s
            .bytes()
            .all(|c| c.is_ascii_digit() || b"+-.eE".contains(&c)) =>
        {
            s.parse().map_err(|_| format!("bad number `{s}`"))
        }
        _ => Err(format!("bad number `{s}`")),
    }
}

fn sample(line: &str) -> Result<Sample, String> {
    let (name, rest) = take_name(line, true)?;
    let (labels, rest) = if rest.starts_with('{') {
        take_labels(rest)?
    } else {
        (Vec::new(), rest)
    };
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("expected ' ' before the value in `{line}`"))?;
    let (value_part, exemplar) = match rest.split_once(" # ") {
        Some((v, e)) => (v, Some(e)),
        None => (rest, None),
    };
    let mut fields = value_part.split(' ');
    let value = number(fields.next().unwrap_or(""))?;
    if let Some(ts) = fields.next() {
        number(ts)?;
    }
    if fields.next().is_some() {
        return Err(format!("trailing text in `{line}`"));
    }
    if let Some(e) = exemplar {
        let (_, r) = take_labels(e)?;
        let r = r
            .strip_prefix(' ')
            .ok_or_else(|| format!("bad exemplar in `{line}`"))?;
        for f in r.split(' ') {
            number(f)?;
        }
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses a whole exposition; `Err` names the first offending line.
pub fn parse_strict(text: &str) -> Result<Vec<Sample>, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .or_else(|| text.strip_suffix("# EOF"))
        .ok_or("the text must end with `# EOF`")?;
    let mut samples = Vec::new();
    for line in body.split_terminator('\n') {
        if let Some(rest) = line.strip_prefix("# ") {
            let (kind, rest) = rest
                .split_once(' ')
                .ok_or_else(|| format!("bad descriptor `{line}`"))?;
            let (_, rest) = take_name(rest, true)?;
            match kind {
                "TYPE" => {
                    let t = rest.strip_prefix(' ').unwrap_or("");
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "stateset",
                        "info",
                        "summary",
                        "unknown",
                    ];
                    if !known.contains(&t) {
                        return Err(format!("bad type in `{line}`"));
                    }
                }
                "HELP" | "UNIT" => {
                    if !(rest.is_empty() || rest.starts_with(' ')) {
                        return Err(format!("bad descriptor `{line}`"));
                    }
                }
                _ => return Err(format!("unknown descriptor `{line}`")),
            }
            continue;
        }
        samples.push(sample(line).map_err(|e| format!("{e} (line `{line}`)"))?);
    }
    Ok(samples)
}
