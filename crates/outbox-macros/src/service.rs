//! `#[outbox_service]`: validate the unit struct and its names, then implement
//! `Service` and register the service.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Fields, Ident, Item, ItemStruct, LitStr};

use crate::attr::{self, Ctxt};
use crate::names::{self, NameKind};

const MACRO: &str = "outbox_service";
const KEYS: &[&str] = &["name", "table", "topic", "group"];

/// A validated service declaration.
struct Service<'a> {
    ident: &'a Ident,
    name: String,
    table: String,
    topic: String,
    group: String,
}

pub fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let item = match syn::parse2::<Item>(input.clone()) {
        Ok(item) => item,
        Err(err) => return attr::with_errors(input, err),
    };
    let cx = Ctxt::new();
    let service = validate(&cx, args, &item);
    match (cx.check(), service) {
        (Ok(()), Some(service)) => {
            let generated = generate(&service);
            let mut out = input;
            out.extend(attr::cfgs(&item));
            out.extend(generated);
            out
        }
        (Err(err), service) => {
            // Still implement `Service` (with the names that could be read), so events
            // naming this service do not fail too: the mistake is reported once, here.
            let fallback = service.map(|s| impl_service(&s)).unwrap_or_default();
            let cfgs = attr::cfgs(&item);
            let mut out = attr::with_errors(input, err);
            out.extend(quote!(#cfgs const _: () = { #fallback };));
            out
        }
        (Ok(()), None) => unreachable!("validation failed without an error"),
    }
}

/// The service, if the item is a unit struct; on errors, with the names that failed
/// left empty.
fn validate<'a>(cx: &Ctxt, args: TokenStream, item: &'a Item) -> Option<Service<'a>> {
    let mut name: Option<Option<String>> = None;
    let mut table: Option<Option<String>> = None;
    let mut topic: Option<Option<String>> = None;
    let mut group: Option<Option<String>> = None;
    let mut name_span: Option<Span> = None;
    attr::parse_args(cx, MACRO, args, KEYS, |arg| {
        if arg.key == "name" {
            name_span = Some(arg.value.span());
        }
        let (slot, kind, example) = match arg.key.to_string().as_str() {
            "name" => (&mut name, NameKind::Service, "\"task\""),
            "table" => (&mut table, NameKind::Table, "\"task_outbox\""),
            "topic" => (&mut topic, NameKind::Topic, "\"outbox.task\""),
            "group" => (&mut group, NameKind::Group, "\"outbox.task.consumer\""),
            _ => unreachable!("parse_args only returns valid keys"),
        };
        let lit = attr::get_lit_str(cx, &arg.key, &arg.value, example);
        *slot = Some(lit.and_then(|lit| checked(cx, kind, &lit)));
    });
    let strukt = unit_struct(cx, item)?;
    let ident = &strukt.ident;

    let name = name.unwrap_or_else(|| {
        let derived = names::kebab_from_camel(&ident.unraw().to_string());
        match names::check_name(NameKind::Service, &derived) {
            Ok(()) => Some(derived),
            Err(why) => {
                cx.error_spanned_by(
                    ident,
                    format!(
                        "{why}; the service name derives from the type name `{ident}` \
                         (kebab-case): rename the type or give the name, \
                         `#[outbox_service(name = \"...\")]`"
                    ),
                );
                None
            }
        }
    });
    let resolve = |given: Option<Option<String>>, default: fn(&str) -> String| match given {
        Some(value) => value.unwrap_or_default(),
        None => name.as_deref().map(default).unwrap_or_default(),
    };
    // A default table can be invalid although the name is not: `pg-sync` derives
    // `pg_sync_outbox`, in PostgreSQL's system namespace.
    if let (None, Some(name)) = (&table, &name) {
        let derived = names::default_table(name);
        if let Err(why) = names::check_name(NameKind::Table, &derived) {
            let span = name_span.unwrap_or_else(|| ident.span());
            cx.error_at(
                span,
                format!(
                    "{why}; the table derives from the service name `{name}`: give one, \
                     `#[outbox_service(table = \"...\")]`"
                ),
            );
        }
    }
    Some(Service {
        ident,
        table: resolve(table, names::default_table),
        topic: resolve(topic, names::default_topic),
        group: resolve(group, names::default_group),
        name: name.unwrap_or_default(),
    })
}

/// The value of a name literal if it passes the grammar; else an error at the literal.
fn checked(cx: &Ctxt, kind: NameKind, lit: &LitStr) -> Option<String> {
    let value = lit.value();
    match names::check_name(kind, &value) {
        Ok(()) => Some(value),
        Err(why) => {
            cx.error_spanned_by(lit, why);
            None
        }
    }
}

fn unit_struct<'a>(cx: &Ctxt, item: &'a Item) -> Option<&'a ItemStruct> {
    let strukt = match item {
        Item::Struct(strukt) => strukt,
        other => {
            cx.error_at(
                item_keyword_span(other),
                "`#[outbox_service]` goes on a unit struct: `pub struct Task;`",
            );
            return None;
        }
    };
    let mut ok = true;
    if !strukt.generics.params.is_empty() || strukt.generics.where_clause.is_some() {
        cx.error_spanned_by(
            &strukt.generics,
            "a service is a non-generic unit struct: `pub struct Task;`",
        );
        ok = false;
    }
    if !matches!(strukt.fields, Fields::Unit) {
        cx.error_spanned_by(
            &strukt.fields,
            format!(
                "a service is a unit struct, a marker type without fields: `pub struct {};`",
                strukt.ident
            ),
        );
        ok = false;
    }
    ok.then_some(strukt)
}

/// The span of the keyword that says what kind of item this is (`fn`, `enum`, ...).
pub fn item_keyword_span(item: &Item) -> Span {
    match item {
        Item::Enum(i) => i.enum_token.span,
        Item::Fn(i) => i.sig.fn_token.span,
        Item::Union(i) => i.union_token.span,
        Item::Struct(i) => i.struct_token.span,
        Item::Impl(i) => i.impl_token.span,
        Item::Trait(i) => i.trait_token.span,
        Item::Type(i) => i.type_token.span,
        Item::Const(i) => i.const_token.span,
        Item::Static(i) => i.static_token.span,
        Item::Mod(i) => i.mod_token.span,
        Item::Use(i) => i.use_token.span,
        other => other.span(),
    }
}

fn impl_service(service: &Service) -> TokenStream {
    let Service {
        ident,
        name,
        table,
        topic,
        group,
    } = service;
    quote! {
        #[automatically_derived]
        impl ::outbox_runtime::__private::Service for #ident {
            const NAME: &'static str = #name;
            const TABLE: &'static str = #table;
            const TOPIC: &'static str = #topic;
            const GROUP: &'static str = #group;
        }
    }
}

fn generate(service: &Service) -> TokenStream {
    let ident = service.ident;
    let rust_type = ident.unraw().to_string();
    let private = quote!(::outbox_runtime::__private);
    let impl_service = impl_service(service);
    quote! {
        #[doc(hidden)]
        const _: () = {
            #impl_service
            #private::inventory::submit! {
                #private::ServiceRegistration::of::<#ident>(
                    ::core::concat!(::core::module_path!(), "::", #rust_type)
                )
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
    fn defaults_derive_from_the_type_name() {
        let out = normalized(expand(
            quote!(),
            quote!(
                pub struct ActiveScheduler;
            ),
        ));
        assert!(
            out.contains(r#"constNAME:&'staticstr="active-scheduler";"#),
            "{out}"
        );
        assert!(
            out.contains(r#"constTABLE:&'staticstr="active_scheduler_outbox";"#),
            "{out}"
        );
        assert!(
            out.contains(r#"constTOPIC:&'staticstr="outbox.active-scheduler";"#),
            "{out}"
        );
        assert!(out.contains("inventory::submit!"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn overrides_replace_the_defaults() {
        let out = normalized(expand(
            quote!(name = "agent", table = "outbox_events"),
            quote!(
                pub struct Agent;
            ),
        ));
        assert!(out.contains(r#"constNAME:&'staticstr="agent";"#), "{out}");
        assert!(
            out.contains(r#"constTABLE:&'staticstr="outbox_events";"#),
            "{out}"
        );
        assert!(
            out.contains(r#"constGROUP:&'staticstr="outbox.agent.consumer";"#),
            "{out}"
        );
    }

    #[test]
    fn a_derived_table_in_a_system_namespace_is_an_error() {
        let out = normalized(expand(
            quote!(),
            quote!(
                pub struct PgSync;
            ),
        ));
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(out.contains("startswith`pg_`"), "{out}");
        assert!(out.contains("derivesfromtheservicename`pg-sync`"), "{out}");
        assert!(!out.contains("inventory"), "{out}");
    }

    #[test]
    fn errors_keep_the_item_and_a_fallback_impl_but_no_registration() {
        let out = normalized(expand(
            quote!(table = "task-outbox", topc = "x"),
            quote!(
                pub struct Task;
            ),
        ));
        assert!(out.starts_with("pubstructTask;"), "{out}");
        assert_eq!(out.matches("compile_error").count(), 2, "{out}");
        assert!(
            out.contains("impl::outbox_runtime::__private::ServiceforTask"),
            "{out}"
        );
        assert!(!out.contains("inventory"), "{out}");
    }
}
