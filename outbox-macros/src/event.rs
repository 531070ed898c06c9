//! `#[outbox_event]`: validate the type and its options, then implement `Event`, the
//! routing proofs `PublishedThrough` / `HandledBy` for the owning service, and register
//! the event.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Fields, Ident, Item, LitInt, LitStr, Token, Type};

use crate::attr::{self, Ctxt, ServiceRef};
use crate::names::{self, NameKind};
use crate::service::item_keyword_span;

const MACRO: &str = "outbox_event";
const KEYS: &[&str] = &[
    "service",
    "name",
    "version",
    "key",
    "max_retries",
    "upcast",
    "public",
];
/// The keys that take a list, with an example for the error message.
const LISTS: &[(&str, &str)] = &[("upcast", "1 = TaskCreatedV1, 2 = TaskCreatedV2")];
/// The keys written alone.
const FLAGS: &[&str] = &["public"];

/// A validated event declaration.
struct Event<'a> {
    ident: &'a Ident,
    service: ServiceRef,
    name: String,
    version: u32,
    max_retries: Option<u32>,
    key: Option<(Ident, &'a Type)>,
    /// The older versions (`upcast(N = Type, ...)`), oldest first; empty unless the
    /// chain is valid.
    upcast: Vec<(u32, Type)>,
    /// `public`: other services may subscribe to it.
    public: bool,
}

/// One `N = Type` of `upcast(...)`, as written.
struct UpcastEntry {
    version: LitInt,
    ty: Type,
}

impl syn::parse::Parse for UpcastEntry {
    fn parse(input: syn::parse::ParseStream) -> syn::Result<Self> {
        let version = input.parse::<LitInt>().map_err(|e| {
            syn::Error::new(
                e.span(),
                "expected `N = Type` in `upcast(...)`: the older version's number, then the \
                 type its rows are read as, e.g. `upcast(1 = TaskCreatedV1, 2 = TaskCreatedV2)`",
            )
        })?;
        input.parse::<Token![=]>()?;
        let ty = input.parse::<Type>()?;
        Ok(UpcastEntry { version, ty })
    }
}

pub fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let item = match syn::parse2::<Item>(input.clone()) {
        Ok(item) => item,
        Err(err) => return attr::with_errors(input, err),
    };
    let cx = Ctxt::new();
    let event = validate(&cx, args, &item);
    match (cx.check(), event) {
        (Ok(()), Some(event)) => {
            let generated = generate(&event);
            let mut out = input;
            out.extend(attr::cfgs(&item));
            out.extend(generated);
            out
        }
        (Err(err), event) => {
            // Still implement the traits when the type and its service are known, so
            // code using the event (publishers, handlers) does not fail too: the
            // mistake is reported once, here.
            // Without the upcast chain, whose types are checked only once the
            // declaration is right.
            let fallback = event
                .map(|mut e| {
                    e.upcast.clear();
                    impl_event(&e)
                })
                .unwrap_or_default();
            let cfgs = attr::cfgs(&item);
            let mut out = attr::with_errors(input, err);
            out.extend(quote!(#cfgs const _: () = { #fallback };));
            out
        }
        (Ok(()), None) => unreachable!("validation failed without an error"),
    }
}

/// The event, if the type and its service could be read; on other errors, with the
/// defaults in place of the values that failed.
fn validate<'a>(cx: &Ctxt, args: TokenStream, item: &'a Item) -> Option<Event<'a>> {
    let target = match item {
        Item::Struct(s) => Some((&s.ident, &s.generics, Some(&s.fields))),
        Item::Enum(e) => Some((&e.ident, &e.generics, None)),
        _ => None,
    };
    let mut service = None;
    let mut service_given = false;
    let mut name = None;
    let mut version = None;
    let mut max_retries = None;
    let mut key = None;
    let mut upcast = None;
    let mut public = false;
    let args = attr::parse_args_with_lists(cx, MACRO, args, KEYS, LISTS, FLAGS, |arg| {
        let (k, v) = (&arg.key, &arg.value);
        match k.to_string().as_str() {
            "service" => {
                service_given = true;
                service = attr::get_service(cx, k, v);
            }
            "name" => {
                let ident = target.map(|(ident, _, _)| ident);
                name = attr::get_lit_str(cx, k, v, "\"TaskCreated\"")
                    .and_then(|lit| event_name(cx, &lit, ident));
            }
            "version" => version = attr::get_u32(cx, k, v, 1),
            "max_retries" => max_retries = attr::get_u32(cx, k, v, 0),
            "upcast" => upcast = parse_upcast(cx, k, v),
            "public" => public = true,
            "key" => {
                if let (Some(field), Some((ident, _, fields))) =
                    (attr::get_ident(cx, k, v, "task_id"), target)
                {
                    key = key_field(cx, ident, fields, field);
                }
            }
            _ => unreachable!("parse_args only returns valid keys"),
        }
    });
    if !service_given {
        cx.error_at(
            proc_macro2::Span::call_site(),
            format!(
                "missing `service = ...` in `#[outbox_event]`: name the service that owns the \
                 event, e.g. `#[outbox_event(service = Task)]`; the valid keys are {}",
                attr::list(KEYS)
            ),
        );
    }

    let (ident, generics, _) = match (item, target) {
        (_, Some(target)) => target,
        (Item::Union(u), _) => {
            cx.error_spanned_by(
                u.union_token,
                "an outbox event is a struct or an enum that derives `Serialize` and \
                 `Deserialize`; unions are not supported",
            );
            return None;
        }
        (other, _) => {
            cx.error_at(
                item_keyword_span(other),
                "`#[outbox_event]` goes on a struct or an enum that derives `Serialize` and \
                 `Deserialize`",
            );
            return None;
        }
    };
    if !generics.params.is_empty() || generics.where_clause.is_some() {
        let found = if generics.params.is_empty() {
            attr::pretty(&generics.where_clause)
        } else {
            attr::pretty(generics)
        };
        cx.error_spanned_by(
            generics,
            format!(
                "outbox events must be 'static and non-generic, found `{found}`: every event \
                 type is one entry of the catalog; use a concrete struct per event"
            ),
        );
        return None;
    }
    let given = |key: &str| args.iter().any(|a| a.key == key);
    let name = match name {
        Some(name) => name,
        None if given("name") => String::new(),
        None => {
            let derived = ident.unraw().to_string();
            if let Err(why) = names::check_name(NameKind::EventType, &derived) {
                cx.error_spanned_by(
                    ident,
                    format!(
                        "{why}; the event type name defaults to the type name: give one with \
                         `name = \"...\"`"
                    ),
                );
            }
            derived
        }
    };
    let upcast = match (upcast, version) {
        (Some((key, entries)), Some(current)) => check_chain(cx, &key, entries, current, true),
        // `version` omitted: the current version is 1, below which nothing exists.
        (Some((key, entries)), None) if !given("version") => {
            check_chain(cx, &key, entries, 1, false)
        }
        // `version` given but wrong: already reported; the chain is not checked
        // against a guess.
        _ => Vec::new(),
    };
    Some(Event {
        ident,
        service: service?,
        name,
        version: version.unwrap_or(1),
        max_retries,
        key,
        upcast,
        public,
    })
}

/// `upcast(N = Type, ...)`: the entries, or errors for the malformed ones.
fn parse_upcast(cx: &Ctxt, key: &Ident, value: &Expr) -> Option<(Ident, Vec<UpcastEntry>)> {
    let Expr::Verbatim(tokens) = value else {
        return None;
    };
    let parser = Punctuated::<UpcastEntry, Token![,]>::parse_terminated;
    match syn::parse::Parser::parse2(parser, tokens.clone()) {
        Ok(entries) if entries.is_empty() => {
            cx.error_spanned_by(
                key,
                "`upcast()` is empty: list the older versions, e.g. \
                 `upcast(1 = TaskCreatedV1)`, or drop it",
            );
            None
        }
        Ok(entries) => Some((key.clone(), entries.into_iter().collect())),
        Err(err) => {
            cx.syn_error(err);
            None
        }
    }
}

/// Checks the chain against the current version: each older version below it, none
/// twice, no gap up to `current - 1`. One error per mistake; the valid chain, oldest
/// first, when there is none.
fn check_chain(
    cx: &Ctxt,
    key: &Ident,
    entries: Vec<UpcastEntry>,
    current: u32,
    version_given: bool,
) -> Vec<(u32, Type)> {
    let mut chain: Vec<(u32, Type)> = Vec::new();
    let mut ok = true;
    for entry in entries {
        let lit = &entry.version;
        let version = match lit.base10_parse::<u32>() {
            Ok(0) => {
                cx.error_spanned_by(lit, "versions start at 1: an older version is at least 1");
                ok = false;
                continue;
            }
            Ok(n) if lit.suffix().is_empty() || lit.suffix() == "u32" => n,
            _ => {
                cx.error_spanned_by(
                    lit,
                    format!(
                        "an older version is an integer from 1 to {}",
                        current.max(2) - 1
                    ),
                );
                ok = false;
                continue;
            }
        };
        if version >= current {
            let fix = if version_given {
                match current {
                    2 => "the only older version is 1".to_owned(),
                    _ => format!("older versions go from 1 to {}", current - 1),
                }
            } else {
                "give the type its own version with `version = N` (older versions are below \
                 it)"
                .to_owned()
            };
            cx.error_spanned_by(
                lit,
                format!(
                    "`upcast` lists version {version}, but the current version of this type \
                     is {current}: an older version must be below it; {fix}"
                ),
            );
            ok = false;
            continue;
        }
        if chain.iter().any(|(v, _)| *v == version) {
            cx.error_spanned_by(
                lit,
                format!(
                    "version {version} is listed twice in `upcast`: each older version has \
                     one type"
                ),
            );
            ok = false;
            continue;
        }
        chain.push((version, entry.ty));
    }
    chain.sort_by_key(|(v, _)| *v);
    if let Some(&(oldest, _)) = chain.first() {
        let missing: Vec<String> = (oldest..current)
            .filter(|v| !chain.iter().any(|(have, _)| have == v))
            .map(|v| v.to_string())
            .collect();
        if !missing.is_empty() {
            cx.error_spanned_by(
                key,
                format!(
                    "the upcast chain has a gap: no type for version {} (the chain runs from \
                     version {oldest} to the current {current}, each version converting into \
                     the next); add `{} = TypeV{}` or drop the versions below it",
                    missing.join(", "),
                    missing[0],
                    missing[0]
                ),
            );
            ok = false;
        }
    }
    if ok {
        chain
    } else {
        Vec::new()
    }
}

fn event_name(cx: &Ctxt, lit: &LitStr, ident: Option<&Ident>) -> Option<String> {
    let value = lit.value();
    match names::check_name(NameKind::EventType, &value) {
        Ok(()) => Some(value),
        Err(why) => {
            let default = match ident {
                Some(ident) => {
                    format!(" (or drop `name` to use the type name `{}`)", ident.unraw())
                }
                None => String::new(),
            };
            cx.error_spanned_by(lit, format!("{why}{default}"));
            None
        }
    }
}

/// `key = field`: the field and its type, or an error naming the available fields.
fn key_field<'a>(
    cx: &Ctxt,
    ident: &Ident,
    fields: Option<&'a Fields>,
    field: Ident,
) -> Option<(Ident, &'a Type)> {
    let named = match fields {
        Some(Fields::Named(named)) => named,
        Some(_) => {
            cx.error_spanned_by(
                &field,
                format!(
                    "`key` names a field, but `{ident}` has no named fields; use a struct \
                     with named fields, or drop `key`"
                ),
            );
            return None;
        }
        None => {
            cx.error_spanned_by(
                &field,
                format!(
                    "`key` is only supported on structs with named fields; `{ident}` is an \
                     enum: drop `key`, or publish it with an explicit key"
                ),
            );
            return None;
        }
    };
    let wanted = field.unraw().to_string();
    let mut available = Vec::new();
    for f in &named.named {
        let Some(name) = &f.ident else { continue };
        let name_str = name.unraw().to_string();
        if name_str == wanted {
            return Some((name.clone(), &f.ty));
        }
        available.push(name_str);
    }
    let suggestion = attr::did_you_mean(&wanted, available.iter().map(String::as_str))
        .map(|s| format!("did you mean `{s}`? "))
        .unwrap_or_default();
    let fields = if available.is_empty() {
        "it has no fields".to_owned()
    } else {
        format!("the fields are {}", attr::list(&available))
    };
    cx.error_spanned_by(
        &field,
        format!("no field `{wanted}` in `{ident}` to use as the key; {suggestion}{fields}"),
    );
    None
}

/// The trait impls: `Event`, `PublishedThrough<S>` and `HandledBy<S>`.
///
/// `Event` is implemented whether or not the type derives serde's traits: rustc then
/// checks them as `Event`'s supertraits, once, at the type's name (the impl's self type
/// keeps its span), with serde's hint to derive them; and every use of the event
/// (`publish`, a handler) still finds its impls, so none fails with a false message
/// such as "owned by another service". The impls are guarded only by the service
/// being a service (`for<'__guard>` keeps rustc from rejecting the bound as trivially
/// false), so a type that is not a service is reported once, by the registration in
/// [`generate`], and not again by every impl.
fn impl_event(event: &Event) -> TokenStream {
    let Event {
        ident,
        service,
        name,
        version,
        max_retries,
        key,
        upcast,
        public,
    } = event;
    let private = quote!(::outbox_runtime::__private);
    let service_ty = &service.ty;
    let max_retries = option_u32(*max_retries);
    let key_body = match key {
        Some((field, ty)) => {
            // Spanned at the field's type: a type that cannot be a key fails there, with
            // the message of `EventKey`'s `on_unimplemented`.
            let check = quote_spanned! {attr::at(ty.span())=>
                __outbox_key::<#ty>
            };
            quote! {
                fn __outbox_key<K: ?::core::marker::Sized + #private::EventKey>(
                    key: &K,
                ) -> ::core::option::Option<::std::string::String> {
                    #private::EventKey::to_key(key)
                }
                #check(&self.#field)
            }
        }
        None => quote!(::core::option::Option::None),
    };
    let guard_service = quote!(for<'__guard> #service_ty: #private::Service);
    let decode = decode_fn(ident, *version, upcast);
    let public_impl = public.then(|| {
        quote! {
            #[automatically_derived]
            impl #private::PublicEvent for #ident
            where
                for<'__guard> #ident: #private::Event,
                #guard_service,
            {
            }
        }
    });
    quote! {
        #[automatically_derived]
        impl #private::Event for #ident
        where
            #guard_service,
        {
            type Service = #service_ty;
            const EVENT_TYPE: &'static str = #name;
            const VERSION: u32 = #version;
            const MAX_RETRIES: ::core::option::Option<u32> = #max_retries;
            fn key(&self) -> ::core::option::Option<::std::string::String> {
                #key_body
            }
            #decode
        }

        #[automatically_derived]
        impl #private::PublishedThrough<#service_ty> for #ident
        where
            for<'__guard> #ident: #private::Event,
            #guard_service,
        {
        }

        #[automatically_derived]
        impl #private::HandledBy<#service_ty> for #ident
        where
            for<'__guard> #ident: #private::Event,
            #guard_service,
        {
        }

        #public_impl
    }
}

/// `Event::decode` for a type with an upcast chain (none without: the trait's default
/// reads every version up to the current one as the current type). Each older type is
/// read as itself, then converted step by step; the calls that need `DeserializeOwned`
/// and `Into<next>` are spanned at the older type and written once each, so a missing
/// impl is one error, there.
fn decode_fn(ident: &Ident, current: u32, chain: &[(u32, Type)]) -> TokenStream {
    if chain.is_empty() {
        return TokenStream::new();
    }
    let private = quote!(::outbox_runtime::__private);
    let step = |i: usize| format_ident!("__outbox_upcast_v{}", chain[i].0);
    let mut steps = TokenStream::new();
    let mut arms = TokenStream::new();
    for (i, (v, ty)) in chain.iter().enumerate() {
        let span = attr::at(ty.span());
        let this = step(i);
        let next_ty = match chain.get(i + 1) {
            Some((_, next)) => quote!(#next),
            None => quote!(#ident),
        };
        let convert = quote_spanned!(span=> #private::upcast::<#ty, #next_ty>(old));
        let body = match chain.get(i + 1) {
            Some(_) => {
                let next = step(i + 1);
                quote!(#next(#convert))
            }
            None => convert,
        };
        steps.extend(quote! {
            fn #this(old: #ty) -> #ident {
                #body
            }
        });
        let read = quote_spanned!(span=> #private::decode_version::<#ty>);
        arms.extend(quote! {
            #v => #read(<Self as #private::Event>::EVENT_TYPE, version, payload).map(#this),
        });
    }
    let known = chain.iter().map(|(v, _)| v);
    quote! {
        fn decode(
            version: u32,
            payload: &[u8],
        ) -> ::core::result::Result<Self, #private::DecodeError> {
            #steps
            match version {
                #current => #private::decode_version::<Self>(
                    <Self as #private::Event>::EVENT_TYPE,
                    version,
                    payload,
                ),
                #arms
                _ => ::core::result::Result::Err(#private::DecodeError::unknown_version(
                    <Self as #private::Event>::EVENT_TYPE,
                    version,
                    &[#(#known),*],
                    #current,
                )),
            }
        }
    }
}

fn option_u32(value: Option<u32>) -> TokenStream {
    match value {
        Some(n) => quote!(::core::option::Option::Some(#n)),
        None => quote!(::core::option::Option::None),
    }
}

/// The impls, the assertions and the registration.
fn generate(event: &Event) -> TokenStream {
    let Event {
        ident,
        service,
        name,
        version,
        max_retries,
        key,
        upcast,
        public,
    } = event;
    let private = quote!(::outbox_runtime::__private);
    let service_ty = &service.ty;
    let rust_type = ident.unraw().to_string();
    let max_retries = option_u32(*max_retries);
    let key_field = match key {
        Some((field, _)) => {
            let field_name = field.unraw().to_string();
            quote!(::core::option::Option::Some(#field_name))
        }
        None => quote!(::core::option::Option::None),
    };
    let name_assertion = attr::service_name_assertion(service);
    // Spanned at the service: a type that is not a service fails there, once, with the
    // message of `Service`'s `on_unimplemented` (the impls above are guarded).
    let service_name = quote_spanned! {attr::at(service_ty.span())=>
        <#service_ty as ::outbox_runtime::__private::Service>::NAME
    };
    let service_table = quote_spanned! {attr::at(service_ty.span())=>
        <#service_ty as ::outbox_runtime::__private::Service>::TABLE
    };
    let impls = impl_event(event);
    let schema_of = |ty: TokenStream, fn_name: &Ident| {
        quote! {
            fn #fn_name() -> ::core::option::Option<#private::serde_json::Value> {
                #[allow(unused_imports)]
                use #private::{HasSchema as _, NoSchema as _};
                (&#private::SchemaProbe::<#ty>::new()).schema()
            }
        }
    };
    let mut schemas = schema_of(quote!(#ident), &format_ident!("__outbox_schema"));
    let mut older = Vec::new();
    for (v, ty) in upcast {
        let fn_name = format_ident!("__outbox_schema_v{}", v);
        schemas.extend(schema_of(quote!(#ty), &fn_name));
        let ty_name = attr::pretty(ty);
        older.push(quote! {
            #private::OlderVersion {
                version: #v,
                rust_type: ::core::concat!(::core::module_path!(), "::", #ty_name),
                schema: #fn_name,
            }
        });
    }
    quote! {
        #[doc(hidden)]
        const _: () = {
            // Names the type outside its impls, so a type this crate only receives
            // (handled, never constructed) is not reported as dead code.
            const fn __outbox_event_type<T>() {}
            const _: () = __outbox_event_type::<#ident>();
            #name_assertion

            #impls
            #schemas

            // Written out rather than `EventRegistration::of::<T>()`, which would
            // require `T: Event` and repeat the errors of the assertions above.
            #private::inventory::submit! {
                #private::EventRegistration {
                    event_type: #name,
                    version: #version,
                    service: #service_name,
                    service_table: #service_table,
                    max_retries: #max_retries,
                    key_field: #key_field,
                    rust_type: ::core::concat!(::core::module_path!(), "::", #rust_type),
                    older_versions: &[#(#older),*],
                    schema: __outbox_schema,
                    public: #public,
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::expand;

    fn normalized(tokens: proc_macro2::TokenStream) -> String {
        tokens.to_string().split_whitespace().collect()
    }

    #[test]
    fn options_reach_the_impl_and_the_registration() {
        let out = normalized(expand(
            quote!(
                service = Task,
                name = "task.created",
                version = 2,
                max_retries = 3,
                key = id
            ),
            quote!(
                pub struct TaskCreated {
                    pub id: String,
                }
            ),
        ));
        assert!(
            out.contains(r#"constEVENT_TYPE:&'staticstr="task.created";"#),
            "{out}"
        );
        assert!(out.contains("constVERSION:u32=2u32;"), "{out}");
        assert!(out.contains("Option::Some(3u32)"), "{out}");
        assert!(
            out.contains(r#"key_field:::core::option::Option::Some("id")"#),
            "{out}"
        );
        assert!(out.contains("typeService=Task;"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn the_string_form_names_the_camel_case_type() {
        let out = normalized(expand(
            quote!(service = "active-scheduler"),
            quote!(
                pub enum SlotChanged {
                    Freed,
                }
            ),
        ));
        assert!(out.contains("typeService=ActiveScheduler;"), "{out}");
        assert!(
            out.contains(r#"constEVENT_TYPE:&'staticstr="SlotChanged";"#),
            "{out}"
        );
    }

    #[test]
    fn every_mistake_is_reported_and_the_item_kept() {
        let out = normalized(expand(
            quote!(
                service = Task,
                version = 0,
                name = 5,
                key = nope,
                colour = 1
            ),
            quote!(
                pub struct TaskCreated {
                    pub id: String,
                }
            ),
        ));
        assert!(
            out.starts_with("pubstructTaskCreated{pubid:String"),
            "{out}"
        );
        assert_eq!(out.matches("compile_error").count(), 4, "{out}");
        assert!(!out.contains("inventory"), "{out}");
    }

    #[test]
    fn an_upcast_chain_reaches_the_decoder_and_the_registration() {
        let out = normalized(expand(
            quote!(service = Task, version = 3, upcast(2 = V2, 1 = old::V1)),
            quote!(
                pub struct TaskCreated {
                    pub id: String,
                }
            ),
        ));
        assert!(!out.contains("compile_error"), "{out}");
        // Oldest first, each step once: V1 -> V2 -> TaskCreated.
        assert!(
            out.contains("fn__outbox_upcast_v1(old:old::V1)->TaskCreated{__outbox_upcast_v2("),
            "{out}"
        );
        assert!(
            out.contains("fn__outbox_upcast_v2(old:V2)->TaskCreated{"),
            "{out}"
        );
        assert!(out.contains("&[1u32,2u32],3u32"), "{out}");
        assert!(
            out.contains(r#""::","old::V1"),schema:__outbox_schema_v1"#),
            "{out}"
        );
    }

    #[test]
    fn each_chain_mistake_is_one_error() {
        let errors = |args: proc_macro2::TokenStream| {
            let out = expand(
                args,
                quote!(
                    pub struct E {
                        pub id: String,
                    }
                ),
            );
            normalized(out).matches("compile_error").count()
        };
        // A gap (2), a duplicate (1), a version not below the current one (4).
        assert_eq!(
            errors(quote!(
                service = Task,
                version = 4,
                upcast(1 = A, 3 = C, 1 = B, 4 = D)
            )),
            3
        );
        // `version` itself wrong: reported once, the chain not checked against a guess.
        assert_eq!(
            errors(quote!(service = Task, version = 0, upcast(1 = A))),
            1
        );
        assert_eq!(errors(quote!(service = Task, upcast(0 = A))), 1);
        assert_eq!(
            errors(quote!(service = Task, version = 2, upcast(1 = A))),
            0
        );
    }

    #[test]
    fn generic_events_are_rejected() {
        let out = expand(
            quote!(service = Task),
            quote!(
                pub struct E<T> {
                    t: T,
                }
            ),
        );
        assert!(out.to_string().contains("non-generic"), "{out}");
    }
}
