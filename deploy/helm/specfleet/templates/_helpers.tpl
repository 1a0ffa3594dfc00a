{{/*
Shared names, labels and pod pieces. Component templates call the pod helpers with
  (dict "root" $ "component" "router|draft|target")
and read that component's values as (index .root.Values .component). A draft pool (see "specfleet.draftPools")
adds "values" (its own values, read instead) and, for an item of draftPools, "pool" (its name).
*/}}

{{- define "specfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "specfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects: "<fullname>-<component>", or "<fullname>-draft-<pool>" for a draftPools item
(the fullname shortened so that the name fits a DNS label, as a Service name must). */}}
{{- define "specfleet.componentName" -}}
{{- if .pool }}
{{- $width := min 52 (sub 61 (add (len .component) (len .pool))) }}
{{- printf "%s-%s-%s" (include "specfleet.fullname" .root | trunc (int $width) | trimSuffix "-") .component .pool }}
{{- else }}
{{- printf "%s-%s" (include "specfleet.fullname" .root | trunc 52 | trimSuffix "-") .component }}
{{- end }}
{{- end }}

{{/* Where a component's values live, for error messages: "draft", or "draftPools[<name>]" for a pool. */}}
{{- define "specfleet.valuesPath" -}}
{{- if .pool }}
{{- printf "draftPools[%s]" .pool }}
{{- else }}
{{- .component }}
{{- end }}
{{- end }}

{{- define "specfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of a component. */}}
{{- define "specfleet.labels" -}}
helm.sh/chart: {{ include "specfleet.chart" .root }}
{{ include "specfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: specfleet
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* Selector labels of a component (stable across upgrades). */}}
{{- define "specfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specfleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
specfleet/draft-pool: {{ . }}
{{- end }}
{{- end }}

{{- define "specfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-router" (include "specfleet.fullname" . | trunc 56 | trimSuffix "-")) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image of a component: "<repository>:<tag or appVersion>-<flavor>". */}}
{{- define "specfleet.image" -}}
{{- $values := default (index .root.Values .component) .values }}
{{- printf "%s:%s-%s" .root.Values.image.repository (default .root.Chart.AppVersion .root.Values.image.tag) $values.image.flavor }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------- */}}
{{/* Redis */}}

{{/* Secret and key holding the Redis password; empty name when there is none. */}}
{{- define "specfleet.redis.secretName" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}
{{- default (printf "%s-redis" (include "specfleet.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}
{{- else if .Values.externalRedis.url }}
{{- .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "specfleet.redis.secretKey" -}}
{{- if .Values.redis.enabled }}
{{- .Values.redis.auth.existingSecretKey }}
{{- else }}
{{- .Values.externalRedis.existingSecretKey }}
{{- end }}
{{- end }}

{{/* The URL given to --redis-url; the password, when any, comes from $(REDIS_PASSWORD) (expanded by Kubernetes). */}}
{{- define "specfleet.redis.url" -}}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" (ne (include "specfleet.redis.secretName" .) "") }}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s%s-redis:%d/%d" $auth (include "specfleet.fullname" .) (int .Values.redis.port) (int .Values.redis.db) }}
{{- else if .Values.externalRedis.url }}
{{- $parts := splitList "://" .Values.externalRedis.url }}
{{- printf "%s://%s%s" (first $parts) $auth (last $parts) }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------- */}}
{{/* Models */}}

{{/* Folder a hub model is downloaded to, inside the cache volume. */}}
{{- define "specfleet.model.hubDir" -}}
{{- printf "/cache/huggingface/models/%s" .name }}
{{- end }}

{{/* The --model argument for a model spec {source, name}. */}}
{{- define "specfleet.model.arg" -}}
{{- if eq .source "huggingface" }}
{{- include "specfleet.model.hubDir" . }}
{{- else }}
{{- .name }}
{{- end }}
{{- end }}

{{/*
An init container downloading a hub model into the cache volume (before the service starts, so the service
itself never contacts the hub). Called with (dict "root" $ "component" ... "model" {source,name,revision}
"tokenizerOnly" bool); renders nothing unless the model's source is huggingface.
*/}}
{{- define "specfleet.model.initContainer" -}}
{{- if eq .model.source "huggingface" }}
- name: fetch-model
  image: {{ include "specfleet.image" . }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["python", "-c"]
  args:
    - |
      import sys
      from huggingface_hub import snapshot_download
      repo, revision, folder, tokenizer_only = sys.argv[1:5]
      skip = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx"] if tokenizer_only == "true" else None
      snapshot_download(repo_id=repo, revision=revision or None, local_dir=folder, ignore_patterns=skip)
      print(f"{repo} is in {folder}")
    - {{ .model.name | quote }}
    - {{ .model.revision | quote }}
    - {{ include "specfleet.model.hubDir" .model | quote }}
    - {{ ternary "true" "false" .tokenizerOnly | quote }}
  env:
    {{- include "specfleet.env.base" . | nindent 4 }}
    {{- with .root.Values.models.huggingface.tokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $.root.Values.models.huggingface.tokenSecretKey }}
    {{- end }}
  {{- /* The component's requests and memory limit; downloading needs no GPU. */}}
  resources:
    {{- toYaml (default (index .root.Values .component) .values).resources | nindent 4 }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "specfleet.volumeMounts" . | trim | nindent 4 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------- */}}
{{/* Draft pools */}}

{{/* Merges the map .src into the map .dst, in place: maps key by key (recursively), anything else (lists too)
replaced. Unlike mergeOverwrite in every Helm version, a false, 0 or "" in .src replaces as well. */}}
{{- define "specfleet.merge" -}}
{{- $dst := .dst }}
{{- range $key, $value := .src }}
{{- if and (kindIs "map" $value) (kindIs "map" (get $dst $key)) }}
{{- include "specfleet.merge" (dict "dst" (get $dst $key) "src" $value) }}
{{- else }}
{{- $_ := set $dst $key $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The draft pools to deploy, set as .out.pools when called with (dict "root" $ "out" (dict)): a list of contexts
(dict "root" $ "component" "draft" "values" <the pool's values> ["pool" <name>]) for the pod helpers. None while
draft.enabled is false. With draftPools empty, one pool from draft: under today's names. Else one per draftPools item
(less those with enabled: false): draft: with the item's keys over it, image, probes, pdb, autoscaling, podAnnotations
and podLabels merged key by key, any other key replacing draft:'s value whole. A sparse_self pool drafts with the
target's weights: target.model, unless it gives its own model.
*/}}
{{- define "specfleet.draftPools" -}}
{{- $root := .root }}
{{- $pools := list }}
{{- if $root.Values.draft.enabled }}
{{- if not $root.Values.draftPools }}
{{- $values := deepCopy $root.Values.draft }}
{{- if eq $values.drafter "sparse_self" }}
{{- $_ := set $values "model" (merge (deepCopy $root.Values.target.model) (dict "revision" "")) }}
{{- end }}
{{- $pools = append $pools (dict "root" $root "component" "draft" "values" $values) }}
{{- else }}
{{- $seen := dict }}
{{- range $item := $root.Values.draftPools }}
{{- $name := required "every draftPools item needs a name" $item.name }}
{{- if hasKey $seen $name }}
{{- fail (printf "draftPools: more than one pool is named %q (each name must be unique: it names the pool's objects and the router's pool)" $name) }}
{{- end }}
{{- $_ := set $seen $name true }}
{{- $values := deepCopy $root.Values.draft }}
{{- range $key, $value := omit $item "name" "model" }}
{{- if and (has $key (list "image" "probes" "pdb" "autoscaling" "podAnnotations" "podLabels")) (kindIs "map" $value) }}
{{- $_ := include "specfleet.merge" (dict "dst" (get $values $key) "src" (deepCopy $value)) }}
{{- else }}
{{- $_ := set $values $key (deepCopy $value) }}
{{- end }}
{{- end }}
{{- if hasKey $item "model" }}
{{- $_ := set $values "model" (merge (deepCopy $item.model) (dict "revision" "")) }}
{{- else if eq $values.drafter "sparse_self" }}
{{- $_ := set $values "model" (merge (deepCopy $root.Values.target.model) (dict "revision" "")) }}
{{- end }}
{{- if and (eq $values.drafter "llamacpp") (eq $values.model.source "huggingface") }}
{{- fail (printf "draftPools[%s]: a llamacpp draft runs a GGUF file (model.source preset or path), not a hub model" $name) }}
{{- end }}
{{- if $values.enabled }}
{{- $pools = append $pools (dict "root" $root "component" "draft" "values" $values "pool" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set .out "pools" $pools }}
{{- end }}

{{/* The router's --drafts: empty while draft.enabled is false; else router.drafts when set; else the chart's draft
Service (k8s://<fullname>-draft.<namespace>:<port>) or, for draftPools, one name=k8s://<Service>.<namespace>:<port>
entry per pool. */}}
{{- define "specfleet.router.drafts" -}}
{{- if .Values.draft.enabled }}
{{- if .Values.router.drafts }}
{{- .Values.router.drafts }}
{{- else }}
{{- $out := dict }}
{{- $_ := include "specfleet.draftPools" (dict "root" . "out" $out) }}
{{- $entries := list }}
{{- range $ctx := $out.pools }}
{{- $address := printf "k8s://%s.%s:%d" (include "specfleet.componentName" $ctx) $.Release.Namespace (int $ctx.values.port) }}
{{- if $ctx.pool }}
{{- $address = printf "%s=%s" $ctx.pool $address }}
{{- end }}
{{- $entries = append $entries $address }}
{{- end }}
{{- join "," $entries }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------- */}}
{{/* Pod pieces, called with (dict "root" $ "component" ...) */}}

{{/* Environment every container of a component needs. Variables referenced as $(VAR) come first. */}}
{{- define "specfleet.env.base" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: SPECFLEET_CACHE
  value: /cache
- name: HF_HOME
  value: /cache/huggingface
- name: XDG_CACHE_HOME
  value: /cache/xdg
{{- end }}

{{- define "specfleet.env" -}}
{{- $root := .root }}
{{- $values := default (index $root.Values .component) .values }}
{{- include "specfleet.env.base" . }}
{{- $secret := include "specfleet.redis.secretName" $root }}
{{- if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "specfleet.redis.secretKey" $root }}
{{- end }}
{{- $security := $root.Values.security }}
{{- $token := $security.internalToken }}
{{- if $token.existingSecret }}
{{- if and (ne .component "router") $token.otherRoutersKey }}
{{- /* Draft and target answer this release's routers and the others, each token a caller of its own: the service
reads one token per line, and Kubernetes expands the $(...) references from the two variables above it. */}}
- name: SPECFLEET_RELEASE_ROUTERS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $token.existingSecret }}
      key: {{ $token.secretKey }}
- name: SPECFLEET_OTHER_ROUTERS_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ $token.existingSecret }}
      key: {{ $token.otherRoutersKey }}
- name: SPECFLEET_INTERNAL_TOKEN
  value: "$(SPECFLEET_RELEASE_ROUTERS_TOKEN)\n$(SPECFLEET_OTHER_ROUTERS_TOKENS)"
{{- else }}
- name: SPECFLEET_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $token.existingSecret }}
      key: {{ $token.secretKey }}
{{- end }}
{{- end }}
{{- if and (eq .component "router") $security.apiKeys.existingSecret }}
- name: SPECFLEET_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $security.apiKeys.existingSecret }}
      key: {{ $security.apiKeys.secretKey }}
{{- end }}
{{- if and (eq .component "router") $security.adminKeys.existingSecret }}
- name: SPECFLEET_ADMIN_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $security.adminKeys.existingSecret }}
      key: {{ $security.adminKeys.secretKey }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "%s-%s" $root.Values.otel.serviceNamePrefix .component | quote }}
{{- $attributes := list (printf "service.namespace=%s" $root.Release.Namespace) "service.instance.id=$(POD_NAME)" "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.node.name=$(NODE_NAME)" (printf "service.version=%s" $root.Chart.AppVersion) }}
{{- with .pool }}
{{- $attributes = append $attributes (printf "specfleet.draft_pool=%s" .) }}
{{- end }}
{{- range $key, $value := $root.Values.otel.resourceAttributes }}
{{- $attributes = append $attributes (printf "%s=%s" $key (toString $value)) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attributes | quote }}
{{- if $root.Values.otel.enabled }}
{{- if not $root.Values.otel.endpoint }}
{{- fail "otel.enabled needs otel.endpoint (the OTLP collector, e.g. http://otel-collector.observability:4317)" }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $root.Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $root.Values.otel.protocol | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_METRICS_EXPORTER
  value: otlp
{{- else }}
- name: OTEL_TRACES_EXPORTER
  value: none
- name: OTEL_METRICS_EXPORTER
  value: none
{{- end }}
- name: OTEL_LOGS_EXPORTER
  value: none
{{- with $values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Flags every service takes: listen address, Redis, metrics, logging. */}}
{{- define "specfleet.args.common" -}}
{{- $values := default (index .root.Values .component) .values }}
- --host
- 0.0.0.0
- --port
- {{ $values.port | quote }}
{{- with include "specfleet.redis.url" .root }}
- --redis-url
- {{ . | quote }}
{{- end }}
- --metrics-port
- {{ .root.Values.metrics.port | quote }}
- --log-level
- {{ .root.Values.logLevel | quote }}
{{- /* The drain fits in the pod's grace period after the preStop sleep, with a few seconds to spare. */}}
{{- $drain := sub (sub (int $values.terminationGracePeriodSeconds) (int $values.preStopSleepSeconds)) 5 }}
{{- if lt $drain 1 }}
{{- fail (printf "%s.terminationGracePeriodSeconds must exceed preStopSleepSeconds by more than 5 s (the drain)" (include "specfleet.valuesPath" .)) }}
{{- end }}
- --drain-timeout-s
- {{ $drain | quote }}
{{- end }}

{{- define "specfleet.ports" -}}
{{- $values := default (index .root.Values .component) .values }}
- name: grpc
  containerPort: {{ $values.port }}
  protocol: TCP
- name: metrics
  containerPort: {{ .root.Values.metrics.port }}
  protocol: TCP
{{- if $values.httpPort }}
- name: http
  containerPort: {{ $values.httpPort }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* Native gRPC probes on grpc.health.v1; the startup probe covers model download and conversion. The kubelet's
gRPC probes speak no TLS: a router serving TLS is probed on its HTTP API's /health over HTTPS instead (or, without
one, on its port's TCP). */}}
{{- define "specfleet.probes" -}}
{{- $values := default (index .root.Values .component) .values }}
{{- $tls := and (eq .component "router") .root.Values.security.tls.existingSecret }}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{ $kind }}Probe:
  {{- if and $tls $values.httpPort }}
  httpGet:
    path: /health
    port: http
    scheme: HTTPS
  {{- else if $tls }}
  tcpSocket:
    port: grpc
  {{- else }}
  grpc:
    port: {{ $values.port }}
  {{- end }}
  {{- toYaml (index $values.probes $kind) | nindent 2 }}
{{- end }}
{{- end }}

{{/* Where the router finds its TLS certificate and key. */}}
{{- define "specfleet.tlsPath" -}}
/etc/specfleet/tls
{{- end }}

{{- define "specfleet.lifecycle" -}}
{{- $values := default (index .root.Values .component) .values }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ $values.preStopSleepSeconds | quote }}]
{{- end }}

{{- define "specfleet.resources" -}}
{{- $values := default (index .root.Values .component) .values }}
{{- $resources := deepCopy $values.resources }}
{{- if and (hasKey $values "gpu") (gt (int $values.gpu) 0) }}
{{- $limits := default dict (get $resources "limits") }}
{{- $_ := set $limits $values.gpuResourceName (int $values.gpu) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{- define "specfleet.volumeMounts" -}}
- name: cache
  mountPath: /cache
- name: tmp
  mountPath: /tmp
{{- if and (eq .component "router") .root.Values.security.tls.existingSecret }}
- name: tls
  mountPath: {{ include "specfleet.tlsPath" . }}
  readOnly: true
{{- end }}
{{- if ne .root.Values.models.volume.type "none" }}
- name: models
  mountPath: {{ .root.Values.models.volume.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "specfleet.volumes" -}}
{{- $root := .root }}
- name: cache
{{- if eq $root.Values.cache.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ required "cache.claimName is required for cache.type persistentVolumeClaim" $root.Values.cache.claimName }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $root.Values.cache.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if and (eq .component "router") $root.Values.security.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ $root.Values.security.tls.existingSecret }}
{{- end }}
{{- if eq $root.Values.models.volume.type "persistentVolumeClaim" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "models.volume.claimName is required for type persistentVolumeClaim" $root.Values.models.volume.claimName }}
    readOnly: true
{{- else if eq $root.Values.models.volume.type "hostPath" }}
- name: models
  hostPath:
    path: {{ required "models.volume.hostPath is required for type hostPath" $root.Values.models.volume.hostPath }}
    type: Directory
{{- end }}
{{- end }}

{{/* Pod annotations: the component's own plus, when asked, the prometheus.io scrape hints. */}}
{{- define "specfleet.podAnnotations" -}}
{{- $values := default (index .root.Values .component) .values }}
{{- $annotations := deepCopy $values.podAnnotations }}
{{- if .root.Values.metrics.podAnnotations }}
{{- $_ := set $annotations "prometheus.io/scrape" "true" }}
{{- $_ := set $annotations "prometheus.io/port" (toString .root.Values.metrics.port) }}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
{{- end }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling and pod-level settings shared by the three Deployments. */}}
{{- define "specfleet.podSpec.common" -}}
{{- $values := default (index .root.Values .component) .values }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "specfleet.volumes" . | trim | nindent 2 }}
{{- end }}

{{/* The container's fixed parts (everything but args). */}}
{{- define "specfleet.container.common" -}}
image: {{ include "specfleet.image" . }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
ports:
  {{- include "specfleet.ports" . | trim | nindent 2 }}
env:
  {{- include "specfleet.env" . | trim | nindent 2 }}
{{ include "specfleet.probes" . | trim }}
{{ include "specfleet.lifecycle" . | trim }}
resources:
  {{- include "specfleet.resources" . | trim | nindent 2 }}
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
volumeMounts:
  {{- include "specfleet.volumeMounts" . | trim | nindent 2 }}
{{- end }}

{{/* An autoscaling/v2 HorizontalPodAutoscaler for draft or target. */}}
{{- define "specfleet.hpa" -}}
{{- $values := default (index .root.Values .component) .values }}
{{- $scaling := $values.autoscaling }}
{{- if $scaling.enabled }}
{{- if and (not $scaling.targetCPUUtilizationPercentage) (not $scaling.customMetric.name) }}
{{- fail (printf "%s.autoscaling needs targetCPUUtilizationPercentage or customMetric.name" (include "specfleet.valuesPath" .)) }}
{{- end }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "specfleet.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "specfleet.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "specfleet.componentName" . }}
  minReplicas: {{ $scaling.minReplicas }}
  maxReplicas: {{ $scaling.maxReplicas }}
  metrics:
    {{- with $scaling.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- if $scaling.customMetric.name }}
    - type: Pods
      pods:
        metric:
          name: {{ $scaling.customMetric.name }}
        target:
          type: AverageValue
          averageValue: {{ required (printf "%s.autoscaling.customMetric.targetAverageValue is required" (include "specfleet.valuesPath" .)) $scaling.customMetric.targetAverageValue | quote }}
    {{- end }}
{{- end }}
{{- end }}

{{/* A policy/v1 PodDisruptionBudget for a component. */}}
{{- define "specfleet.pdb" -}}
{{- $values := default (index .root.Values .component) .values }}
{{- if $values.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "specfleet.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "specfleet.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "specfleet.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* A headless Service (draft and target): the router watches its EndpointSlices and dials every pod. */}}
{{- define "specfleet.headlessService" -}}
{{- $values := default (index .root.Values .component) .values }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "specfleet.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "specfleet.labels" . | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "specfleet.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $values.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ .root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
{{- end }}
