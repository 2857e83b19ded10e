"""A Kubernetes API server for tests and the local lab, faithful where the node hook depends on it.

No real kube-apiserver can run on these machines, so this threaded HTTP server speaks the subset of the API that
`node_hook/cluster.py` uses, well enough that the official `kubernetes` Python client talks to it unchanged
(`Configuration(host="http://127.0.0.1:PORT")`):

- core `nodes` and the cluster-scoped custom resources of the CRD manifests it is given (group/version/plural read
  from the manifest), each with its `/status` subresource;
- one global, monotonically increasing resourceVersion (like etcd's revision) and a bounded event history: a watch or
  an exact list from a resourceVersion older than the history answers 410 Gone, as a compacted etcd does;
- list (optionally `resourceVersionMatch=Exact`), watch as chunked JSON lines with `allowWatchBookmarks` (BOOKMARK
  events), `timeoutSeconds`, `fieldSelector=metadata.name=...` and equality label selectors;
- create / update (PUT) / patch (JSON patch, merge patch, strategic merge patch for the lists the hook uses) /
  delete, with optimistic concurrency on `metadata.resourceVersion` (409 Conflict), 404 and 409 Status objects
  shaped like the real ones, and status/spec separation for resources with a status subresource;
- garbage collection of dependents: deleting an object deletes every object whose only owner it was (like the
  real garbage collector with background propagation, synchronously);
- fault injection: the next N matching requests fail with a chosen code, a per-request delay, cutting every watch
  stream, compacting the history, and a restart that drops every connection and all watch state.

Not implemented because the hook does not use them: namespaced resources, pagination (`limit` is ignored and no
`continue` token is returned, as the real watch cache does for resourceVersion=0), server-side apply, schema
validation, authentication.
"""
