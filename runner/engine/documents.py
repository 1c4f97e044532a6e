"""The invoice as evidence: each new case gets its invoice's original document (OriginalInvoice).

The spec's `document:` says how to fetch it: a request to the provider (with its credentials), or a link in
the invoice record (fetched without credentials, only from the declared hosts, redirects included). Uploads
go to POST /cases/{id}/files, at most `max_per_run` a run; the ledger (case_documents) marks one `uploading`
before the upload and `uploaded` after it, and an upload found `uploading` (a run stopped between the two) is
looked for in GET /cases/{id}/files before it is sent again. A failed fetch or upload is retried on later runs
(up to `max_attempts`) and never blocks or fails the case.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from loguru import logger

from runner.engine.lifecycle import crash_point
from runner.errors import DestinationError, ProviderError, RunnerError, UnsafeRequest
from runner.net.http import Http, Policy

MAX_BYTES = 25 * 1024 * 1024  # Debitura: "Maximum file size: 25MB"
# Debitura's allowed file types: PDF, Excel (.xls, .xlsx), CSV, text, images (.jpg, .jpeg, .png, .gif).
ALLOWED = {"application/pdf": "pdf", "application/vnd.ms-excel": "xls",
           "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx", "text/csv": "csv",
           "text/plain": "txt", "image/jpeg": "jpg", "image/png": "png", "image/gif": "gif"}
DOCUMENT_TYPE = "OriginalInvoice"
REDIRECTS = (301, 302, 303, 307, 308)


class Refused(RunnerError):
    """A document the destination cannot take (too large, a type it does not allow): not retried."""


def _content_type(header: str | None, content: bytes) -> str:
    ctype = (header or "").split(";")[0].strip().lower()
    if ctype not in ALLOWED and content.startswith(b"%PDF-"):
        return "application/pdf"  # served as application/octet-stream by some providers
    return ctype


async def fetch(source, invoice_id: str, number: str | None) -> tuple[bytes, str] | None:
    """(content, content type) of one invoice's document; None when the source has none for it."""
    doc = source.spec.document
    if doc.request is not None:
        resp = await source.send_spec(doc.request, source.context(invoice_id=invoice_id, number=number or ""),
                                      ok=(404,))
        if resp.status == 404:
            return None
        return resp.content, _content_type(resp.headers.get("content-type"), resp.content)
    if invoice_id in source.document_links:  # read from the page this run fetched
        return await _follow(source, source.document_links[invoice_id])
    lr = source.spec.lookup.get("by_id")
    if lr is None:
        raise RunnerError(f"{source.spec.name}'s `document: url:` reads the invoice, and the spec has no "
                          f"`lookup.by_id` to fetch it", fix=f"add lookup.by_id to {source.spec.file}")
    resp = await source.send_spec(lr.request, source.context(invoice_id=invoice_id), ok=tuple(lr.not_found))
    if resp.status in lr.not_found:
        return None
    rec = lr.record.search(resp.json(f"{source.spec.name}'s invoice answer"))
    link = doc.url.search(rec) if rec else None
    if not link:
        return None
    return await _follow(source, str(link))


async def _follow(source, link: str) -> tuple[bytes, str]:
    """GET a document link that must stay on the spec's declared hosts (redirects too), without credentials."""
    doc = source.spec.document
    links = source.spec.environments[source.conn.environment].links
    for _ in range(4):
        s = urlsplit(link)
        host = (s.hostname or "").lower()
        if s.scheme != "https" or host not in doc.hosts:
            raise UnsafeRequest(f"{source.spec.name} gave a document link to {s.scheme}://{host}, which is not one "
                                f"of the spec's document hosts ({', '.join(doc.hosts)}); it was not fetched",
                                fix=f"if the provider really serves documents there, add the host to "
                                    f"`document: hosts:` in {source.spec.file}")
        origin = f"https://{s.netloc}"
        http = Http(source.clients, links.get(origin, origin), policy=Policy(attempts=3, backoff_s=0.5),
                    label=f"{source.spec.name} documents", pool=source.conn.name + ":documents")
        target = s.path + (f"?{s.query}" if s.query else "")
        resp = await http.request("GET", target, headers={"Accept": "application/pdf, */*"}, ok=REDIRECTS)
        source.http.requests += http.requests  # counted with the connection's requests
        if resp.status in REDIRECTS:
            nxt = resp.headers.get("location")
            if not nxt:
                raise ProviderError(f"{source.spec.name} redirected a document request without saying where")
            link = nxt if "://" in nxt else origin + nxt
            continue
        return resp.content, _content_type(resp.headers.get("content-type"), resp.content)
    raise ProviderError(f"{source.spec.name}'s document link redirected more than 3 times; it was not fetched")


def _short(text: str, limit: int = 300) -> str:
    """An error as kept in the ledger and logs: a server may quote the whole upload back."""
    from runner.redact import redact

    text = redact(text)
    return text if len(text) <= limit else text[:limit] + " …"


def _file_name(source, invoice_id: str, number: str | None, ctype: str) -> str:
    doc = source.spec.document
    if doc.file_name is not None:
        return doc.file_name.render(source.context(invoice_id=invoice_id, number=number or invoice_id))
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in (number or invoice_id))
    return f"invoice-{stem}.{ALLOWED.get(ctype, 'pdf')}"


async def upload(source, store, destination) -> dict:
    """Upload the documents of this account's cases that have none yet. `destination` None: a plan (counts
    what would be uploaded). Returns counts for the run's summary."""
    doc = source.spec.document
    account = source.account_key
    todo = store.documents_to_upload(account, doc.max_per_run, doc.max_attempts)
    if destination is None:
        return {"would_upload": len(todo)} if todo else {}
    if not hasattr(destination, "upload_file"):
        return {}
    out = {"uploaded": 0, "failed": 0, "none": 0, "refused": 0}
    for row, prior in todo:
        iid, case_id = row.invoice_id, row.case_id
        try:
            if prior is not None and prior["status"] in ("uploading", "failed") and prior.get("file_name"):
                # A run stopped (or an answer was lost) between the upload and its record: the case may have it.
                found = next((f for f in await destination.files(case_id)
                              if f.get("fileName") == prior["file_name"] and f.get("documentType") == DOCUMENT_TYPE),
                             None)
                if found is not None:
                    store.set_document(account, iid, case_id, "uploaded", file_id=str(found.get("id") or ""))
                    out["uploaded"] += 1
                    continue
            got = await fetch(source, iid, row.number)
            if got is None:
                store.set_document(account, iid, case_id, "none", error="the source has no document for this invoice")
                out["none"] += 1
                continue
            content, ctype = got
            if ctype not in ALLOWED:
                raise Refused(f"the document is of type {ctype or 'unknown'}, which Debitura does not take "
                              f"(PDF, Excel, CSV, text, JPEG, PNG or GIF)")
            if len(content) > MAX_BYTES:
                raise Refused(f"the document is {len(content) / 1048576:.1f} MB, more than the 25 MB Debitura takes")
            name = _file_name(source, iid, row.number, ctype)
            store.set_document(account, iid, case_id, "uploading", file_name=name, content_type=ctype,
                               size=len(content))
            made = await destination.upload_file(case_id, name, content, ctype, DOCUMENT_TYPE,
                                                 f"Original invoice {row.number or iid} from {source.spec.name}")
            crash_point("after_file_upload")
            store.set_document(account, iid, case_id, "uploaded", file_id=str(made.get("id") or "") or None)
            out["uploaded"] += 1
        except Refused as exc:
            store.set_document(account, iid, case_id, "refused", error=exc.message, attempt=True)
            out["refused"] += 1
        except (RunnerError, UnsafeRequest) as exc:
            why = _short(exc.message)
            store.set_document(account, iid, case_id, "failed", error=why, attempt=True)
            out["failed"] += 1
            logger.warning("{}: the document of invoice {} was not uploaded to case {} (tried again next run): {}",
                           source.conn.name, row.number or iid, row.case_reference or case_id, why)
            if isinstance(exc, DestinationError) and exc.fatal:
                break
    return {k: v for k, v in out.items() if v}
