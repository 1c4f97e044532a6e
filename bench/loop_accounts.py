"""Target 5's peer: the peers' hand-written loop (baseline_httpx.py --orjson, unchanged) once per account, every
account at once in threads of one process: how such a script is made to sync many accounts.

Usage: loop_accounts.py BASELINE_SCRIPT BASE_URL ACCOUNTS
Runs with the peers' own venv (httpx, orjson). Exits 1 if any account's loop failed.
"""
import runpy
import sys
import threading


def main() -> int:
    script, url, accounts = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Every thread runs the script as __main__ with its own globals; it reads sys.argv once, at the top,
    # and every account's argv is the same (one fake server, output to /dev/null).
    sys.argv = [script, url, "--orjson"]
    failed = []

    def one() -> None:
        try:
            runpy.run_path(script, run_name="__main__")
        except BaseException as exc:  # noqa: BLE001 - reported by the exit code
            failed.append(exc)

    threads = [threading.Thread(target=one) for _ in range(accounts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exc in failed[:3]:
        print(f"an account's loop failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
