//! Hook-name patterns (`*` and `?` globs) and nearest-name suggestions.

/// Whether `pattern` contains glob characters.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (dots
/// included) and `?` exactly one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // The position after the last `*` and the text position it was tried at.
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi + 1, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match backtrack {
                Some((after_star, tried)) => {
                    pi = after_star;
                    ti = tried + 1;
                    backtrack = Some((after_star, tried + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Up to `n` of `candidates` closest to `name` by edit distance, closest first.
pub fn nearest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    n: usize,
) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored
        .into_iter()
        .take(n)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// Levenshtein distance between two strings, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_any_run_including_dots() {
        assert!(glob_match(
            "blocks.*.hook_resid_post",
            "blocks.12.hook_resid_post"
        ));
        assert!(glob_match("*", "unembed.hook_out"));
        assert!(glob_match("blocks.*.attn.*", "blocks.0.attn.hook_z"));
        assert!(!glob_match(
            "blocks.*.hook_resid_post",
            "blocks.1.hook_resid_pre"
        ));
        assert!(glob_match("*hook_*", "blocks.1.attn.hook_q"));
    }

    #[test]
    fn question_mark_matches_one_character() {
        assert!(glob_match("blocks.?.hook_z", "blocks.3.hook_z"));
        assert!(!glob_match("blocks.?.hook_z", "blocks.13.hook_z"));
    }

    #[test]
    fn nearest_names_come_closest_first() {
        let names = [
            "blocks.0.hook_resid_pre",
            "blocks.0.hook_resid_post",
            "hook_embed",
        ];
        assert_eq!(
            nearest("blocks.0.hook_resid_pots", names, 1),
            ["blocks.0.hook_resid_post"]
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
