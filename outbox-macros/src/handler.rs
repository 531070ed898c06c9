//! `#[outbox_handler]`: validate the shape of the async fn, then generate the
//! type-erased glue the consumer calls and register the handler.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    FnArg, GenericArgument, GenericParam, Ident, Item, ItemFn, PathArguments, ReturnType, Type,
    TypeParamBound, WherePredicate,
};

use crate::attr::{self, Ctxt, ServiceRef};
use crate::service::item_keyword_span;

const MACRO: &str = "outbox_handler";
const KEYS: &[&str] = &["service", "subscriber"];

const CONTEXT_MESSAGE: &str = "handlers must take `&mut HandlerContext<Db>` as their first \
     argument so your writes and the consumed mark commit in one transaction";

/// The database a handler runs on.
enum Db<'a> {
    /// One backend type: `&mut HandlerContext<Sqlite>`.
    Concrete(&'a Type),
    /// The fn's type parameter: `async fn h<DB: Backend>(ctx: &mut HandlerContext<DB>, ..)`.
    Generic(&'a Ident),
}

/// A validated handler.
struct Handler<'a> {
    func: &'a ItemFn,
    db: Db<'a>,
    event: &'a Type,
    output: &'a Type,
    service: Option<ServiceRef>,
    /// `subscriber = Notification`: the handler runs in that service, on another
    /// service's public event, from its inbox.
    subscriber: Option<ServiceRef>,
}

pub fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let item = match syn::parse2::<Item>(input.clone()) {
        Ok(item) => item,
        Err(err) => return attr::with_errors(input, err),
    };
    let cx = Ctxt::new();
    let handler = validate(&cx, args, &item);
    match (cx.check(), handler) {
        (Ok(()), Some(handler)) => {
            let generated = generate(&handler);
            let mut out = input;
            out.extend(attr::cfgs(&item));
            out.extend(generated);
            out
        }
        (Err(err), _) => attr::with_errors(input, err),
        (Ok(()), None) => unreachable!("validation failed without an error"),
    }
}

fn validate<'a>(cx: &Ctxt, args: TokenStream, item: &'a Item) -> Option<Handler<'a>> {
    let mut service = None;
    let mut subscriber = None;
    let mut service_ok = true;
    let mut owner_key = None;
    attr::parse_args(cx, MACRO, args, KEYS, |arg| {
        let parsed = attr::get_service(cx, &arg.key, &arg.value);
        service_ok &= parsed.is_some();
        match arg.key.to_string().as_str() {
            "service" => {
                owner_key = Some(arg.key.clone());
                service = parsed;
            }
            _ => subscriber = parsed,
        }
    });
    if let (Some(key), Some(_)) = (&owner_key, &subscriber) {
        cx.error_spanned_by(
            key,
            "give either `service = ...` (a handler in the service that owns the event) or \
             `subscriber = ...` (a handler in another service, on the owner's public event), \
             not both",
        );
        service_ok = false;
    }

    let Item::Fn(func) = item else {
        cx.error_at(
            item_keyword_span(item),
            "`#[outbox_handler]` goes on an async fn: \
             `async fn on_event(ctx: &mut HandlerContext<Db>, event: YourEvent) -> Result<(), HandlerError>`",
        );
        return None;
    };
    let sig = &func.sig;
    let name = &sig.ident;
    let mut ok = service_ok;

    if sig.asyncness.is_none() {
        cx.error_spanned_by(
            sig.fn_token,
            format!("an outbox handler must be an `async fn`: write `async fn {name}(...)`"),
        );
        ok = false;
    }
    if let Some(unsafety) = &sig.unsafety {
        cx.error_spanned_by(unsafety, "an outbox handler cannot be `unsafe`");
        ok = false;
    }
    if let Some(abi) = &sig.abi {
        cx.error_spanned_by(abi, "an outbox handler cannot have an `extern` ABI");
        ok = false;
    }
    if let Some(variadic) = &sig.variadic {
        cx.error_spanned_by(variadic, "an outbox handler cannot be variadic");
        ok = false;
    }

    let backend_param = backend_param(cx, func, &mut ok);

    // The parameters: `(ctx: &mut HandlerContext<Db>, event: E)`.
    if let Some(FnArg::Receiver(receiver)) = sig.inputs.first() {
        cx.error_spanned_by(
            receiver,
            "an outbox handler is a free async fn, not a method: move it out of the `impl` \
             block and drop `self`",
        );
        return None;
    }
    let typed: Vec<&syn::PatType> = sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(pat) => Some(pat),
            FnArg::Receiver(_) => None,
        })
        .collect();
    if typed.len() != 2 {
        let found = match typed.len() {
            0 => "none".to_owned(),
            n => n.to_string(),
        };
        let message = format!(
            "an outbox handler takes exactly two arguments, \
             `(ctx: &mut HandlerContext<Db>, event: YourEvent)`; found {found}"
        );
        if sig.inputs.is_empty() {
            cx.error_at(sig.paren_token.span.join(), message);
        } else {
            cx.error_spanned_by(&sig.inputs, message);
        }
        return None;
    }

    // Checked on, whatever the first argument, so every mistake shows at once.
    let db = context_db(cx, &typed[0].ty).and_then(|db_ty| match backend_param {
        Some(param) => match db_ty {
            ty if is_param(ty, param) => Some(Db::Generic(param)),
            other => {
                cx.error_spanned_by(
                    other,
                    format!(
                        "a generic handler's type parameter is the backend: write \
                         `ctx: &mut HandlerContext<{param}>`"
                    ),
                );
                None
            }
        },
        None => Some(Db::Concrete(db_ty)),
    });

    let event = &*typed[1].ty;
    match event {
        Type::Reference(r) => {
            let inner = &r.elem;
            cx.error_spanned_by(
                event,
                format!(
                    "take the event by value, `event: {}`: the handler owns the event decoded \
                     for it",
                    attr::pretty(inner)
                ),
            );
            ok = false;
        }
        Type::ImplTrait(_) | Type::Infer(_) => {
            cx.error_spanned_by(
                event,
                "the second argument is the event: name its type, e.g. `event: TaskCreated`",
            );
            ok = false;
        }
        _ => {}
    }

    let output = match &sig.output {
        ReturnType::Type(_, ty) => Some(&**ty),
        ReturnType::Default => {
            cx.error_at(
                sig.paren_token.span.close(),
                "an outbox handler must return `Result<(), E>` where `E` converts into \
                 `HandlerError`: add `-> Result<(), HandlerError>` and use `?`; returning \
                 `()` would hide failures",
            );
            None
        }
    };

    if !ok {
        return None;
    }
    Some(Handler {
        func,
        db: db?,
        event,
        output: output?,
        service,
        subscriber,
    })
}

/// The fn's single type parameter, the backend, if it has one; every other generic
/// parameter is an error.
fn backend_param<'a>(cx: &Ctxt, func: &'a ItemFn, ok: &mut bool) -> Option<&'a Ident> {
    let generics = &func.sig.generics;
    let mut backend = None;
    for param in &generics.params {
        match param {
            GenericParam::Type(ty) if backend.is_none() => {
                for bound in &ty.bounds {
                    check_backend_bound(cx, &ty.ident, bound, ok);
                }
                backend = Some(&ty.ident);
            }
            other => {
                cx.error_spanned_by(
                    other,
                    "an outbox handler can only be generic over its backend, with one type \
                     parameter: `async fn h<DB: Backend>(ctx: &mut HandlerContext<DB>, ..)`",
                );
                *ok = false;
            }
        }
    }
    if let Some(where_clause) = &generics.where_clause {
        for predicate in &where_clause.predicates {
            match (predicate, backend) {
                (WherePredicate::Type(pt), Some(param))
                    if pt.lifetimes.is_none() && is_param(&pt.bounded_ty, param) =>
                {
                    for bound in &pt.bounds {
                        check_backend_bound(cx, param, bound, ok);
                    }
                }
                _ => {
                    cx.error_spanned_by(
                        predicate,
                        "an outbox handler cannot have where clauses beyond `DB: Backend`: \
                         the consumer runs it for every backend compiled in",
                    );
                    *ok = false;
                }
            }
        }
    }
    backend
}

/// Whether `ty` is exactly the type parameter `param`.
fn is_param(ty: &Type, param: &Ident) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident(param))
}

/// A generic handler runs on every backend, so its parameter can only require what
/// every backend has.
fn check_backend_bound(cx: &Ctxt, param: &Ident, bound: &TypeParamBound, ok: &mut bool) {
    let allowed = match bound {
        TypeParamBound::Trait(t) => t.path.segments.last().is_some_and(|s| {
            matches!(
                s.ident.to_string().as_str(),
                "Backend" | "Send" | "Sync" | "Sized" | "Unpin"
            ) && s.arguments.is_empty()
        }),
        TypeParamBound::Lifetime(l) => l.ident == "static",
        _ => false,
    };
    if !allowed {
        cx.error_spanned_by(
            bound,
            format!(
                "a generic handler can only require `{param}: Backend`: the consumer runs it \
                 for every backend compiled in"
            ),
        );
        *ok = false;
    }
}

/// The `Db` of `&mut HandlerContext<Db>`, or the error that says the first argument must
/// be the handler's transaction.
fn context_db<'a>(cx: &Ctxt, ty: &'a Type) -> Option<&'a Type> {
    let found = || attr::pretty(ty);
    let db = match ty {
        Type::Reference(r) => match &*r.elem {
            Type::Path(p) if p.qself.is_none() => {
                let last = p.path.segments.last()?;
                match (
                    &last.arguments,
                    r.mutability.is_some(),
                    last.ident == "HandlerContext",
                ) {
                    (PathArguments::AngleBracketed(args), true, true) if args.args.len() == 1 => {
                        match args.args.first() {
                            Some(GenericArgument::Type(db)) => Some(db),
                            _ => None,
                        }
                    }
                    (_, false, true) => {
                        cx.error_spanned_by(
                            ty,
                            format!("{CONTEXT_MESSAGE}; it must be `&mut`, found `{}`", found()),
                        );
                        return None;
                    }
                    _ => None,
                }
            }
            _ => None,
        },
        _ => None,
    };
    if db.is_none() {
        cx.error_spanned_by(ty, format!("{CONTEXT_MESSAGE}; found `{}`", found()));
    }
    db
}

fn generate(handler: &Handler) -> TokenStream {
    let Handler {
        func,
        db,
        event,
        output,
        service,
        subscriber,
    } = handler;
    let private = quote!(::outbox_runtime::__private);
    let fn_ident = &func.sig.ident;
    let fn_name = fn_ident.unraw().to_string();

    // Spanned at the fn name: a future that is not `Send` fails at the handler.
    let span = attr::at(fn_ident.span());
    let user_call = match db {
        Db::Concrete(_) => quote_spanned!(span=> #fn_ident(ctx, event)),
        Db::Generic(param) => quote_spanned!(span=> #fn_ident::<#param>(ctx, event)),
    };
    let user_call = quote_spanned! {span=>
        ::outbox_runtime::__private::assert_send(#user_call)
    };
    // Spanned at the return type: a return type that is not a `Result<(), E>` fails
    // there, with the message of `HandlerResult`'s `on_unimplemented`.
    let into_result = quote_spanned! {attr::at(output.span())=>
        <#output as ::outbox_runtime::__private::HandlerResult>::into_handler_result(result)
    };
    let body = quote! {
        ::std::boxed::Box::pin(async move {
            let event = match #private::decode_payload::<#event>(version, payload) {
                ::core::result::Result::Ok(event) => event,
                ::core::result::Result::Err(err) => return ::core::result::Result::Err(err),
            };
            let result = #user_call.await;
            #into_result
        })
    };
    let ret = quote! {
        #private::BoxFuture<'a, ::core::result::Result<(), #private::HandlerError>>
    };

    let factory = match db {
        Db::Concrete(db) => quote! {
            fn __outbox_glue<'a>(
                ctx: &'a mut #private::HandlerContext<#db>,
                version: u32,
                payload: &'a [u8],
            ) -> #ret {
                #body
            }
            static __OUTBOX_FACTORY: #private::ConcreteHandler<#db> =
                #private::ConcreteHandler(__outbox_glue);
        },
        Db::Generic(param) => quote! {
            struct __OutboxHandler;
            #[automatically_derived]
            impl #private::GenericHandler for __OutboxHandler {
                fn call<'a, #param: ::outbox_runtime::Backend>(
                    ctx: &'a mut #private::HandlerContext<#param>,
                    version: u32,
                    payload: &'a [u8],
                ) -> #ret {
                    #body
                }
            }
            static __OUTBOX_FACTORY: #private::GenericHandlerFactory<__OutboxHandler> =
                #private::GenericHandlerFactory::new();
        },
    };

    let service_check = service.as_ref().map(|service| {
        let ty = &service.ty;
        // Located at the service: an event owned by another service fails there, with
        // the message of `HandledBy`'s `on_unimplemented`.
        let event_at_service = attr::located_at(event.to_token_stream(), ty.span());
        let check = quote_spanned! {attr::at(ty.span())=>
            const _: () = __outbox_handled_by::<#ty, #event_at_service>();
        };
        let name_assertion = attr::service_name_assertion(service);
        quote! {
            const fn __outbox_handled_by<S, E>()
            where
                S: #private::Service,
                E: ?::core::marker::Sized + #private::HandledBy<S>,
            {
            }
            #check
            #name_assertion
        }
    });

    let (subscriber_check, registration) = match subscriber {
        Some(subscriber) => {
            let ty = &subscriber.ty;
            // The subscriber is checked at its name (a type that is not a service: one
            // error, the uses below all spanned there), the event at its type (an event
            // its owner did not make public), a service subscribing to its own event at
            // the subscriber.
            let sub = attr::located_at(ty.to_token_stream(), ty.span());
            let event_at = attr::located_at(event.to_token_stream(), event.span());
            let sub_name = quote_spanned! {attr::at(ty.span())=>
                <#sub as #private::Service>::NAME
            };
            let is_public = quote_spanned! {attr::at(event.span())=>
                const _: () = __outbox_public::<#event_at>();
            };
            let own = format!(
                "`{}` subscribes to an event of its own: a service handles its own events \
                 with `#[outbox_handler]` (no `subscriber`), through its own consumer",
                attr::pretty(ty)
            );
            let owner = quote!(<<#event as #private::Event>::Service as #private::Service>::NAME);
            let not_own = attr::const_str_assertion(ty.span(), &owner, &sub_name, true, &own);
            let name_assertion = attr::service_name_assertion(subscriber);
            let check = quote! {
                const fn __outbox_public<E: ?::core::marker::Sized + #private::PublicEvent>() {}
                #is_public
                #not_own
                #name_assertion
            };
            let registration = quote! {
                #private::HandlerRegistration::subscription::<#event>(
                    #sub_name,
                    ::core::concat!(::core::module_path!(), "::", #fn_name),
                    &__OUTBOX_FACTORY,
                )
            };
            (Some(check), registration)
        }
        None => (
            None,
            quote! {
                #private::HandlerRegistration::of::<#event>(
                    ::core::concat!(::core::module_path!(), "::", #fn_name),
                    &__OUTBOX_FACTORY,
                )
            },
        ),
    };

    quote! {
        #[doc(hidden)]
        const _: () = {
            #service_check
            #subscriber_check
            #factory
            #private::inventory::submit! {
                #registration
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::expand;

    fn errors(args: proc_macro2::TokenStream, item: proc_macro2::TokenStream) -> Vec<String> {
        let out = expand(args, item).to_string();
        out.split("compile_error !")
            .skip(1)
            .map(|e| e.split('"').nth(1).unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn a_well_formed_handler_has_no_error() {
        let concrete = quote! {
            async fn h(ctx: &mut HandlerContext<Sqlite>, e: TaskCreated) -> Result<(), HandlerError> { Ok(()) }
        };
        assert_eq!(errors(quote!(), concrete), Vec::<String>::new());
        let generic = quote! {
            async fn h<DB: Backend>(ctx: &mut HandlerContext<DB>, e: TaskCreated) -> Result<(), HandlerError> { Ok(()) }
        };
        assert_eq!(
            errors(quote!(service = Task), generic),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_shape_mistake_is_reported_at_once() {
        let item = quote! {
            fn h<T, U>(pool: &PgPool, e: &TaskCreated) { }
        };
        let errors = errors(quote!(), item);
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert!(errors[0].contains("must be an `async fn`"));
        assert!(errors[1].contains("only be generic over its backend"));
        assert!(errors[2].contains("`&mut HandlerContext<Db>`"));
        assert!(errors[2].contains("found `&PgPool`"));
        assert!(errors[3].contains("take the event by value, `event: TaskCreated`"));
        assert!(errors[4].contains("must return `Result<(), E>`"));
    }

    #[test]
    fn a_generic_parameter_must_be_the_backend() {
        let item = quote! {
            async fn h<DB: Backend + Clone>(ctx: &mut HandlerContext<Sqlite>, e: E) -> Result<(), X> { Ok(()) }
        };
        let errors = errors(quote!(), item);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].contains("can only require `DB: Backend`"));
        assert!(errors[1].contains("write `ctx: &mut HandlerContext<DB>`"));
    }
}
