//! Glob patterns over credential names, as `[[sinks]]` and `[[access]]`
//! write them: `*` and `?`, nothing else. Its own module because matching
//! names is not configuration: the config only holds the patterns.

/// `*` matches any run of characters, `?` any one; everything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with backtracking to the last `*`: linear in practice.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("sales-*", "sales-bot"));
        assert!(!glob_match("sales-*", "ops-bot"));
        assert!(glob_match("a?c*d", "abcxxd"));
        assert!(glob_match("*-bot", "x-y-bot"));
        assert!(!glob_match("a*b", "acbc"));
    }
}
