#!/usr/bin/env bash
# Times the relay's mark on MariaDB with the outbox table as migrated and with `status`
# out of `ix_key` (an `is_open` persistent column in its place): see "status out of
# ix_key, timed" in bench/NOTES.md. Uses database `exp_mark` on 127.0.0.1:3306 (root, no
# password), dropped and recreated; about 10 s.
#
#   bench/experiments/mariadb_mark_ix_key.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mysql_() { mysql -uroot -h127.0.0.1 "$@"; }
python3 - "$work" <<'PY'
import sys
work = sys.argv[1]
ddl = open('outbox-runtime/migrations/mysql/outbox_table.sql').read()
end = ') ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;'
create = ddl[ddl.index('CREATE TABLE IF NOT EXISTS {table}'):ddl.index(end) + len(end)]
a = create.replace('{table}', 'ob_a')
b = create.replace('{table}', 'ob_b').replace(
    'KEY ix_key (service, event_key, status, id)', 'KEY ix_key (service, event_key, is_open, id)')
b = b.replace('    PRIMARY KEY (id),', '    is_open TINYINT AS (status < 2) PERSISTENT,\n    PRIMARY KEY (id),')
assert 'is_open, id' in b and 'PERSISTENT' in b
fill = """INSERT INTO {t} (event_id, service, event_type, event_version, event_key, payload,
  max_retries, next_attempt_at, created_at, updated_at)
SELECT UNHEX(REPLACE(UUID(), '-', '')), 'task', 'task.Created', 1, CONCAT('k', seq % 10000),
  '{{"task_id":"x","n":1}}', 20, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)
FROM seq_1_to_200000;
ANALYZE TABLE {t};
"""
open(f'{work}/setup.sql', 'w').write(
    'DROP DATABASE IF EXISTS exp_mark; CREATE DATABASE exp_mark; USE exp_mark;\n'
    + a + '\n' + b + '\n' + fill.format(t='ob_a') + fill.format(t='ob_b'))
ids = ','.join(str(i) for i in range(1, 501))  # the heads of keys 1..500
for t in ('ob_a', 'ob_b'):
    lines = ['USE exp_mark;', f'UPDATE {t} SET lease_token = 42 WHERE id IN ({ids});']
    for _ in range(40):
        lines += ['BEGIN;',
                  f'UPDATE {t} SET status = 1, published_at = UTC_TIMESTAMP(6), '
                  f'locked_until = NULL, lease_token = 0, updated_at = UTC_TIMESTAMP(6) '
                  f'WHERE id IN ({ids}) AND lease_token = 42;',
                  'ROLLBACK;']
    open(f'{work}/mark_{t}.sql', 'w').write('\n'.join(lines) + '\n')
PY
mysql_ < "$work/setup.sql" > /dev/null
for r in $(seq 1 "$runs"); do
  for t in ob_a ob_b; do
    s=$(date +%s%N)
    mysql_ < "$work/mark_$t.sql"
    e=$(date +%s%N)
    label=$([ "$t" = ob_a ] && echo "as migrated" || echo "is_open in ix_key")
    echo "run $r, $label: $(( (e - s) / 40 / 1000 )) us per mark of 500 rows (+ rollback)"
  done
done
mysql_ -e 'DROP DATABASE exp_mark'
