//! Parsing of the attribute arguments shared by the three macros: `key = value` pairs,
//! with every mistake collected in a [`Ctxt`] and reported at once, each at its token.

use std::cell::RefCell;
use std::fmt::Display;
use std::thread;

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, ExprPath, Ident, Lit, LitInt, LitStr, Meta, Path, Token};

/// Collects errors so that every mistake in one item is reported in one compile.
///
/// Dropping it without calling [`check`](Self::check) panics (as serde's does), so no
/// error can be forgotten.
pub struct Ctxt {
    errors: RefCell<Option<Vec<syn::Error>>>,
}

impl Ctxt {
    pub fn new() -> Self {
        Ctxt {
            errors: RefCell::new(Some(Vec::new())),
        }
    }

    /// An error spanned over the tokens of `obj`.
    pub fn error_spanned_by<A: ToTokens, T: Display>(&self, obj: A, msg: T) {
        self.syn_error(syn::Error::new_spanned(obj.into_token_stream(), msg));
    }

    /// An error at one span.
    pub fn error_at<T: Display>(&self, span: Span, msg: T) {
        self.syn_error(syn::Error::new(span, msg));
    }

    /// A parse error from syn.
    pub fn syn_error(&self, err: syn::Error) {
        self.errors
            .borrow_mut()
            .as_mut()
            .expect("Ctxt used after check")
            .push(err);
    }

    /// Consumes the context: all the errors, combined, if there is any.
    pub fn check(self) -> syn::Result<()> {
        let mut errors = self.errors.take().expect("Ctxt checked twice").into_iter();
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for rest in errors {
            combined.combine(rest);
        }
        Err(combined)
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        if !thread::panicking() && self.errors.borrow().is_some() {
            panic!("forgot to check for errors");
        }
    }
}

/// The original item followed by the errors: the item still exists for the rest of the
/// crate (its derives still run), so one mistake gives one error and no cascade.
pub fn with_errors(item: TokenStream, err: syn::Error) -> TokenStream {
    let mut out = item;
    out.extend(err.into_compile_error());
    out
}

/// The item's `#[cfg(...)]` attributes, to put on the generated code too: an item
/// compiled out takes its impls and registration with it.
pub fn cfgs(item: &syn::Item) -> TokenStream {
    let attrs: &[syn::Attribute] = match item {
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        _ => &[],
    };
    attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg"))
        .map(ToTokens::to_token_stream)
        .collect()
}

/// One `key = value` argument.
pub struct Arg {
    pub key: Ident,
    pub value: Expr,
}

/// Parses `key = value, ...` for the macro `macro_name`, whose valid keys are `valid`.
/// Unknown keys (with a did-you-mean), repeated keys and keys without a value are
/// errors in `cx`. `each` sees every well-formed argument, in source order (so the
/// errors it records interleave with these in source order); the returned list holds
/// them all, each key once.
pub fn parse_args(
    cx: &Ctxt,
    macro_name: &str,
    args: TokenStream,
    valid: &[&str],
    each: impl FnMut(&Arg),
) -> Vec<Arg> {
    parse_args_with_lists(cx, macro_name, args, valid, &[], &[], each)
}

/// [`parse_args`] where the keys of `lists` (key, example) take a list,
/// `key(...)`, whose tokens reach `each` as an `Expr::Verbatim` value, and the keys of
/// `flags` are written alone (`public`) and reach `each` with an empty
/// `Expr::Verbatim`.
pub fn parse_args_with_lists(
    cx: &Ctxt,
    macro_name: &str,
    args: TokenStream,
    valid: &[&str],
    lists: &[(&str, &str)],
    flags: &[&str],
    mut each: impl FnMut(&Arg),
) -> Vec<Arg> {
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args) {
        Ok(metas) => metas,
        Err(err) => {
            cx.syn_error(err);
            return Vec::new();
        }
    };
    let mut out: Vec<Arg> = Vec::new();
    for meta in metas {
        let path = meta.path().clone();
        let Some(key) = path.get_ident() else {
            cx.error_spanned_by(
                &path,
                format!(
                    "expected `key = value` in `#[{macro_name}]`; the valid keys are {}",
                    list(valid)
                ),
            );
            continue;
        };
        let key_str = key.to_string();
        if !valid.contains(&key_str.as_str()) {
            cx.error_spanned_by(key, unknown_key_message(macro_name, &key_str, valid));
            continue;
        }
        let list_example = lists
            .iter()
            .find(|(k, _)| *k == key_str)
            .map(|(_, example)| *example);
        let is_flag = flags.contains(&key_str.as_str());
        let value = match (meta, list_example) {
            (Meta::Path(_), None) if is_flag => Expr::Verbatim(TokenStream::new()),
            (meta, None) if is_flag => {
                cx.error_spanned_by(
                    &meta,
                    format!("`{key_str}` is a flag and takes no value: write `{key_str}` alone"),
                );
                continue;
            }
            (Meta::List(list), Some(_)) => Expr::Verbatim(list.tokens),
            (meta, Some(example)) => {
                cx.error_spanned_by(
                    &meta,
                    format!("`{key_str}` takes a list: write `{key_str}({example})`"),
                );
                continue;
            }
            (Meta::NameValue(nv), None) => nv.value,
            (Meta::Path(_), None) => {
                cx.error_spanned_by(
                    key,
                    format!("`{key_str}` needs a value: write `{key_str} = ...`"),
                );
                continue;
            }
            (Meta::List(list), None) => {
                cx.error_spanned_by(
                    &list,
                    format!("expected `{key_str} = ...`, not `{key_str}(...)`"),
                );
                continue;
            }
        };
        if out.iter().any(|arg| arg.key == *key) {
            cx.error_spanned_by(
                key,
                format!("duplicate key `{key_str}` in `#[{macro_name}]`; give each key once"),
            );
            continue;
        }
        let arg = Arg {
            key: key.clone(),
            value,
        };
        each(&arg);
        out.push(arg);
    }
    out
}

/// The message for an unknown key: a did-you-mean if one is close, and the valid keys.
pub fn unknown_key_message(macro_name: &str, key: &str, valid: &[&str]) -> String {
    match did_you_mean(key, valid.iter().copied()) {
        Some(best) => format!(
            "unknown key `{key}` in `#[{macro_name}]`; did you mean `{best}`? The valid keys are {}",
            list(valid)
        ),
        None => format!(
            "unknown key `{key}` in `#[{macro_name}]`; the valid keys are {}",
            list(valid)
        ),
    }
}

/// `` `a`, `b`, `c` ``.
pub fn list<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| format!("`{}`", s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The candidate closest to `input`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let input_lower = input.to_ascii_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let distance = levenshtein(&input_lower, candidate);
        let close = distance <= (candidate.len() / 3).max(2)
            || (input_lower.len() >= 3
                && (candidate.contains(input_lower.as_str()) || input_lower.contains(candidate)));
        if close && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// The edit distance (insertions, deletions, substitutions) between two strings.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Looks through the invisible groups `macro_rules!` wraps around fragments.
fn ungroup(mut expr: &Expr) -> &Expr {
    while let Expr::Group(group) = expr {
        expr = &group.expr;
    }
    expr
}

/// A short description of what an expression is, for "expected X, found Y" messages.
fn describe(expr: &Expr) -> &'static str {
    match ungroup(expr) {
        Expr::Lit(ExprLit { lit, .. }) => match lit {
            Lit::Str(_) => "a string",
            Lit::Int(_) => "an integer",
            Lit::Float(_) => "a float",
            Lit::Bool(_) => "a bool",
            _ => "a literal",
        },
        Expr::Path(_) => "a path",
        Expr::Unary(_) => "a negative number",
        _ => "an expression",
    }
}

/// `key = "..."`: the string literal, or an error saying so.
pub fn get_lit_str(cx: &Ctxt, key: &Ident, value: &Expr, example: &str) -> Option<LitStr> {
    if let Expr::Lit(ExprLit {
        lit: Lit::Str(s), ..
    }) = ungroup(value)
    {
        return Some(s.clone());
    }
    cx.error_spanned_by(
        value,
        format!(
            "`{key}` takes a string literal, found {}: write `{key} = {example}`",
            describe(value)
        ),
    );
    None
}

/// `key = N` with `N` a `u32`, at least `min`: the number, or an error saying so.
pub fn get_u32(cx: &Ctxt, key: &Ident, value: &Expr, min: u32) -> Option<u32> {
    match ungroup(value) {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => parse_u32(cx, key, int, min),
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => {
            let hint = match s.value().trim().parse::<u32>() {
                Ok(n) => format!("write `{key} = {n}` without quotes"),
                Err(_) => format!("write `{key} = {}`", min.max(1)),
            };
            cx.error_spanned_by(
                value,
                format!("`{key}` takes an integer, found a string: {hint}"),
            );
            None
        }
        Expr::Unary(_) => {
            cx.error_spanned_by(
                value,
                format!(
                    "`{key}` cannot be negative: give an integer from {min} to {}",
                    u32::MAX
                ),
            );
            None
        }
        other => {
            cx.error_spanned_by(
                value,
                format!(
                    "`{key}` takes an integer literal, found {}: write `{key} = {}`",
                    describe(other),
                    min.max(1)
                ),
            );
            None
        }
    }
}

fn parse_u32(cx: &Ctxt, key: &Ident, int: &LitInt, min: u32) -> Option<u32> {
    if int.base10_digits().starts_with('-') {
        cx.error_spanned_by(
            int,
            format!(
                "`{key}` cannot be negative: give an integer from {min} to {}",
                u32::MAX
            ),
        );
        return None;
    }
    if !matches!(int.suffix(), "" | "u32") {
        cx.error_spanned_by(
            int,
            format!("`{key}` is a u32: drop the `{}` suffix", int.suffix()),
        );
        return None;
    }
    match int.base10_parse::<u32>() {
        Ok(n) if n >= min => Some(n),
        Ok(_) => {
            let why = if key == "version" {
                "versions start at 1".to_owned()
            } else {
                format!("the smallest allowed value is {min}")
            };
            cx.error_spanned_by(int, format!("`{key}` must be at least {min}: {why}"));
            None
        }
        Err(_) => {
            cx.error_spanned_by(
                int,
                format!("`{key}` must be an integer from {min} to {}", u32::MAX),
            );
            None
        }
    }
}

/// The value of `key = some::Type`, or `None` if it is not a plain path.
pub fn as_type_path(value: &Expr) -> Option<&Path> {
    match ungroup(value) {
        Expr::Path(ExprPath {
            qself: None, path, ..
        }) => Some(path),
        _ => None,
    }
}

/// The value of `key = some_ident`, or an error saying so.
pub fn get_ident(cx: &Ctxt, key: &Ident, value: &Expr, example: &str) -> Option<Ident> {
    if let Some(ident) = as_type_path(value).and_then(Path::get_ident) {
        return Some(ident.clone());
    }
    cx.error_spanned_by(
        value,
        format!(
            "`{key}` takes a field name, found {}: write `{key} = {example}`",
            describe(value)
        ),
    );
    None
}

/// The service an event or handler names: `service = Task` or `service = "task"`.
pub struct ServiceRef {
    /// The service type (for the string form, `Ident` spanned on the literal).
    pub ty: Path,
    /// The literal of the string form.
    pub by_name: Option<LitStr>,
}

/// `service = Type` or `service = "name"`; the string form names the type whose
/// UpperCamelCase spelling matches (`"active-scheduler"` → `ActiveScheduler`).
pub fn get_service(cx: &Ctxt, key: &Ident, value: &Expr) -> Option<ServiceRef> {
    if let Some(path) = as_type_path(value) {
        return Some(ServiceRef {
            ty: path.clone(),
            by_name: None,
        });
    }
    if let Expr::Lit(ExprLit {
        lit: Lit::Str(lit), ..
    }) = ungroup(value)
    {
        let name = lit.value();
        if let Err(why) = crate::names::check_name(crate::names::NameKind::Service, &name) {
            cx.error_spanned_by(lit, why);
            return None;
        }
        let ident = Ident::new(&camel_from_kebab(&name), lit.span());
        return Some(ServiceRef {
            ty: Path::from(ident),
            by_name: Some(lit.clone()),
        });
    }
    cx.error_spanned_by(
        value,
        format!(
            "`{key}` takes the service type or its name, found {}: write `{key} = Task` or `{key} = \"task\"`",
            describe(value)
        ),
    );
    None
}

/// For the string form: a compile-time check that the type the name resolved to is
/// the service of exactly that name (the name may have been overridden with
/// `#[outbox_service(name = ...)]`).
pub fn service_name_assertion(service: &ServiceRef) -> TokenStream {
    let Some(lit) = &service.by_name else {
        return TokenStream::new();
    };
    let ty = &service.ty;
    let message = format!(
        "`service = \"{name}\"` names the type `{ty}`, but the name of that service is not \"{name}\"; write `service = {ty}` or use its declared name",
        name = lit.value(),
        ty = ty.to_token_stream(),
    );
    let declared = quote::quote!(<#ty as ::outbox_runtime::__private::Service>::NAME);
    let given = lit.to_token_stream();
    const_str_assertion(lit.span(), &declared, &given, false, &message)
}

/// A compile-time check of two `&'static str` expressions: a panic with `message`
/// (reported at `span`) when they are equal and `panic_if_equal`, or differ and not.
pub fn const_str_assertion(
    span: Span,
    left: &TokenStream,
    right: &TokenStream,
    panic_if_equal: bool,
    message: &str,
) -> TokenStream {
    quote::quote_spanned! {at(span)=>
        const _: () = {
            let left = #left.as_bytes();
            let right = #right.as_bytes();
            let mut same = left.len() == right.len();
            let mut i = 0;
            while same && i < right.len() {
                same = left[i] == right[i];
                i += 1;
            }
            if same == #panic_if_equal {
                ::core::panic!(#message);
            }
        };
    }
}

/// A span that resolves names like the macro's own tokens (call-site hygiene) but is
/// reported at `location`: for generated code whose errors belong to a user token.
pub fn at(location: Span) -> Span {
    Span::call_site().located_at(location)
}

/// The tokens, each moved to `span` for error locations (name resolution unchanged).
pub fn located_at(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let proc_macro2::TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), located_at(group.stream(), span));
                inner.set_span(group.span().located_at(span));
                tree = proc_macro2::TokenTree::Group(inner);
            } else {
                tree.set_span(tree.span().located_at(span));
            }
            tree
        })
        .collect()
}

/// Tokens as source text, without the spaces `TokenStream::to_string` puts between
/// every token: `& mut HandlerContext < Sqlite >` → `&mut HandlerContext<Sqlite>`.
pub fn pretty<T: ToTokens>(tokens: T) -> String {
    let raw: Vec<char> = tokens.to_token_stream().to_string().chars().collect();
    let at = |i: usize| raw.get(i).copied().unwrap_or(' ');
    let mut out = String::with_capacity(raw.len());
    for (i, &c) in raw.iter().enumerate() {
        if c != ' ' {
            out.push(c);
            continue;
        }
        let prev = if i == 0 { ' ' } else { at(i - 1) };
        let next = at(i + 1);
        // `a :: b` and `T : Clone` lose the space before the colon; `a :: b` also the
        // one after.
        let path_sep_prev = prev == ':' && i >= 2 && at(i - 2) == ':';
        let glue = matches!(prev, '&' | '<' | '(' | '[')
            || matches!(next, '<' | '>' | ',' | ')' | ']' | ';' | ':')
            || path_sep_prev;
        if !glue {
            out.push(' ');
        }
    }
    out
}

/// `active-scheduler` → `ActiveScheduler`: the type a string service name refers to.
pub fn camel_from_kebab(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        if c == '-' || c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    #[test]
    fn pretty_prints_tokens_as_written() {
        assert_eq!(
            pretty(quote!(&HandlerContext<Sqlite>)),
            "&HandlerContext<Sqlite>"
        );
        assert_eq!(
            pretty(quote!(&mut HandlerContext<DB>)),
            "&mut HandlerContext<DB>"
        );
        assert_eq!(pretty(quote!(&sqlx::SqlitePool)), "&sqlx::SqlitePool");
        assert_eq!(
            pretty(quote!(&::sqlx::Pool<Sqlite>)),
            "&::sqlx::Pool<Sqlite>"
        );
        assert_eq!(pretty(quote!(<'a>)), "<'a>");
        assert_eq!(pretty(quote!(<T: Clone, U>)), "<T: Clone, U>");
        assert_eq!(pretty(quote!(&'a str)), "&'a str");
        assert_eq!(
            pretty(quote!(Result<(), HandlerError>)),
            "Result<(), HandlerError>"
        );
        assert_eq!(pretty(quote!(Vec<Vec<u8>>)), "Vec<Vec<u8>>");
        assert_eq!(pretty(quote!(where T: Clone)), "where T: Clone");
        assert_eq!(
            pretty(quote!(Box<dyn Error + Send>)),
            "Box<dyn Error + Send>"
        );
    }

    #[test]
    fn levenshtein_counts_edits() {
        assert_eq!(levenshtein("", ""), 0);
        assert_eq!(levenshtein("topc", "topic"), 1);
        assert_eq!(levenshtein("name", "nmae"), 2);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("abc", ""), 3);
    }

    #[test]
    fn did_you_mean_suggests_close_keys_only() {
        let keys = ["service", "name", "version", "key", "max_retries"];
        assert_eq!(did_you_mean("servce", keys), Some("service"));
        assert_eq!(did_you_mean("verison", keys), Some("version"));
        assert_eq!(did_you_mean("max_retry", keys), Some("max_retries"));
        assert_eq!(did_you_mean("retries", keys), Some("max_retries"));
        assert_eq!(did_you_mean("Name", keys), Some("name"));
        assert_eq!(did_you_mean("topic", keys), None);
        assert_eq!(did_you_mean("partition", keys), None);
        let service_keys = ["name", "table", "topic", "group"];
        assert_eq!(did_you_mean("topc", service_keys), Some("topic"));
        assert_eq!(did_you_mean("tables", service_keys), Some("table"));
        assert_eq!(did_you_mean("consumer_group", service_keys), Some("group"));
    }

    #[test]
    fn unknown_key_lists_the_valid_keys() {
        let msg = unknown_key_message("outbox_service", "topc", &["name", "table", "topic"]);
        assert_eq!(
            msg,
            "unknown key `topc` in `#[outbox_service]`; did you mean `topic`? \
             The valid keys are `name`, `table`, `topic`"
        );
        let msg = unknown_key_message("outbox_service", "zzz", &["name"]);
        assert_eq!(
            msg,
            "unknown key `zzz` in `#[outbox_service]`; the valid keys are `name`"
        );
    }

    #[test]
    fn camel_from_kebab_inverts_the_default_name_rule() {
        assert_eq!(camel_from_kebab("active-scheduler"), "ActiveScheduler");
        assert_eq!(camel_from_kebab("task"), "Task");
        for ident in ["Task", "ActiveScheduler", "Notification", "ABTest"] {
            let name = crate::names::kebab_from_camel(ident);
            if !name.contains("--") {
                assert_eq!(
                    crate::names::kebab_from_camel(&camel_from_kebab(&name)),
                    name
                );
            }
        }
    }

    fn parse(tokens: TokenStream, valid: &[&str]) -> (Vec<String>, Option<String>) {
        let cx = Ctxt::new();
        let args = parse_args(&cx, "m", tokens, valid, |_| {});
        let keys = args.iter().map(|a| a.key.to_string()).collect();
        let err = cx.check().err().map(|e| {
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        });
        (keys, err)
    }

    #[test]
    fn parse_args_collects_every_mistake() {
        let (keys, err) = parse(
            quote!(name = "a", name = "b", nmae = "c", table),
            &["name", "table"],
        );
        assert_eq!(keys, ["name"]);
        let err = err.unwrap();
        assert!(err.contains("duplicate key `name`"), "{err}");
        assert!(
            err.contains("unknown key `nmae` in `#[m]`; did you mean `name`?"),
            "{err}"
        );
        assert!(err.contains("`table` needs a value"), "{err}");
    }

    #[test]
    fn parse_args_accepts_empty_and_trailing_comma() {
        assert_eq!(parse(quote!(), &["name"]), (vec![], None));
        assert_eq!(
            parse(quote!(name = "x",), &["name"]),
            (vec!["name".to_owned()], None)
        );
    }

    #[test]
    fn literal_getters_reject_wrong_types() {
        let cx = Ctxt::new();
        let key: Ident = syn::parse_quote!(version);
        assert_eq!(get_u32(&cx, &key, &syn::parse_quote!(3), 1), Some(3));
        assert_eq!(get_u32(&cx, &key, &syn::parse_quote!("1"), 1), None);
        assert_eq!(get_u32(&cx, &key, &syn::parse_quote!(0), 1), None);
        assert_eq!(get_u32(&cx, &key, &syn::parse_quote!(-1), 1), None);
        assert_eq!(get_u32(&cx, &key, &syn::parse_quote!(4294967296), 1), None);
        let name: Ident = syn::parse_quote!(name);
        assert!(get_lit_str(&cx, &name, &syn::parse_quote!(5), "\"x\"").is_none());
        let errors: Vec<String> = cx
            .check()
            .unwrap_err()
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(errors[0].contains("write `version = 1` without quotes"));
        assert!(errors[1].contains("versions start at 1"));
        assert!(errors[4].contains("`name` takes a string literal, found an integer"));
    }
}
