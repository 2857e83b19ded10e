"""A Kubernetes API server for tests and the local lab, faithful where the node hook and an operator's kubectl
depend on it.

No real kube-apiserver can run on these machines, so this threaded HTTP server speaks the subset of the API that
`node_hook/cluster.py` uses, well enough that the official `kubernetes` Python client and the official `kubectl`
talk to it unchanged:

- the built-in types `kubectl apply -k conf/` and `kubectl describe` touch (resources.BUILTIN_TYPES: nodes,
  namespaces, configmaps, serviceaccounts, events, pods, daemonsets, leases, RBAC, admission policies, CRDs),
  namespaced ones under /namespaces/<ns>/, and the custom resources of every CustomResourceDefinition it holds
  (given at start or created through the API), each with its `/status` subresource;
- discovery (/api, /apis, /api/v1, /apis/<group>/<version>), /version, /openapi/v3 as kubectl reads it, and
  `meta.k8s.io/v1` Tables (kubectl's node columns, a CRD's additionalPrinterColumns);
- one global, monotonically increasing resourceVersion (like etcd's revision) and a bounded event history: a watch or
  an exact list from a resourceVersion older than the history answers 410 Gone, as a compacted etcd does;
- list (optionally `resourceVersionMatch=Exact`), watch as chunked JSON lines with `allowWatchBookmarks` (BOOKMARK
  events), `timeoutSeconds`, field selectors (`=`, `!=`) and equality label selectors;
- create / update (PUT) / patch (JSON patch, merge patch, strategic merge patch with the built-in types' merge keys)
  / delete, with optimistic concurrency on `metadata.resourceVersion` (409 Conflict), 404 and 409 Status objects
  shaped like the real ones, and status/spec separation for resources with a status subresource;
- garbage collection of dependents: deleting an object deletes every object whose only owner it was (like the
  real garbage collector with background propagation, synchronously);
- fault injection: the next N matching requests fail with a chosen code, a per-request delay, cutting every watch
  stream, compacting the history, and a restart that drops every connection and all watch state.

Not implemented: server-side apply (kubectl's client-side apply works), protobuf and CBOR encodings.
"""
