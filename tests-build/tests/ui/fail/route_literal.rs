// A route is built by the catalog alone, from checked names: not with a struct literal.
use outbox_runtime::Route;

fn main() {
    let _route = Route {
        service: "task".parse().unwrap(),
        table: "task_outbox".parse().unwrap(),
        topic: "outbox.task".parse().unwrap(),
        group: "outbox.task.consumer".parse().unwrap(),
        rust_type: String::new(),
    };
}
