{{/* Base name of every object: fullnameOverride or the release name. */}}
{{- define "warren.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "warren.rabbitmq.fullname" -}}{{ include "warren.fullname" . }}-rabbitmq{{- end -}}
{{- define "warren.rabbitmq.headless" -}}{{ include "warren.fullname" . }}-rabbitmq-headless{{- end -}}
{{- define "warren.rabbitmq.secret" -}}{{ include "warren.fullname" . }}-rabbitmq{{- end -}}
{{- define "warren.rabbitmq.cookieSecret" -}}{{ include "warren.fullname" . }}-rabbitmq-erlang-cookie{{- end -}}
{{- define "warren.sender.fullname" -}}{{ include "warren.fullname" . }}-sender{{- end -}}
{{- define "warren.admin.fullname" -}}{{ include "warren.fullname" . }}-admin{{- end -}}
{{- define "warren.postgres.fullname" -}}{{ include "warren.fullname" . }}-postgres{{- end -}}
{{- define "warren.controller.fullname" -}}{{ include "warren.fullname" . }}-controller{{- end -}}

{{- define "warren.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels shared by every object. */}}
{{- define "warren.labels" -}}
helm.sh/chart: {{ include "warren.chart" . }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: warren
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "sender"). */}}
{{- define "warren.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- /* The pods of every worker pool (worker.pools: one Deployment, one component each). */ -}}
{{- define "warren.workerPoolsSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
warren.dev/role: worker
{{- end -}}

{{- define "warren.componentLabels" -}}
{{ include "warren.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image reference of one of warren's binaries; call with (dict "root" $ "image" .Values.sender.image). */}}
{{- define "warren.image" -}}
{{- $registry := .root.Values.image.registry -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- if $registry -}}
{{ printf "%s/%s:%s" (trimSuffix "/" $registry) .image.repository $tag }}
{{- else -}}
{{ printf "%s:%s" .image.repository $tag }}
{{- end -}}
{{- end -}}

{{/* Pod-level security context of warren's own pods (distroless, UID 65532). */}}
{{- define "warren.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container security context of warren's own containers. */}}
{{- define "warren.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
AMQP credentials from the RabbitMQ Secret, then AMQP_URL built from them with
dependent environment variables: the password never appears in the pod spec.
Call with (dict "root" $ "queue" "<WARREN_QUEUE>").
*/}}
{{- define "warren.amqpEnv" -}}
{{- $queue := .queue -}}
{{- with .root -}}
- name: RABBITMQ_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "warren.rabbitmq.secret" . }}
      key: username
- name: RABBITMQ_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "warren.rabbitmq.secret" . }}
      key: password
- name: AMQP_URL
  value: "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@{{ include "warren.rabbitmq.fullname" . }}:{{ int .Values.rabbitmq.ports.amqp }}/%2f"
- name: WARREN_QUEUE
  value: {{ $queue | quote }}
- name: WARREN_QUEUE_TYPE
  value: {{ .Values.queue.type | quote }}
{{- end -}}
{{- end -}}

{{/* Retention of the audit events log, applied by whichever process declares it first. */}}
{{- define "warren.eventsEnv" -}}
- name: WARREN_EVENTS_MAX_AGE
  value: {{ .Values.events.maxAge | quote }}
- name: WARREN_EVENTS_MAX_BYTES
  value: {{ .Values.events.maxBytes | int64 | toString | quote }}
{{- end -}}

{{- define "warren.logEnv" -}}
- name: WARREN_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
- name: WARREN_LOG
  value: {{ .Values.log.filter | quote }}
{{- end -}}

{{/*
The HTTP listener of one of warren's processes (its API where it has one, /metrics,
/healthz, /readyz): WARREN_LISTEN_ADDR on the component's ports.http value, which is
also the container port named "http" that the probes, Services and monitors use.
Call each with the component's ports.http.
*/}}
{{- define "warren.listenEnv" -}}
- name: WARREN_LISTEN_ADDR
  value: {{ printf "0.0.0.0:%d" (int .) | quote }}
{{- end -}}

{{- define "warren.containerPorts" -}}
- name: http
  containerPort: {{ int . }}
{{- end -}}

{{/* The pod annotations that classic Prometheus discovery reads (prometheus.io/*). */}}
{{- define "warren.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ int . | toString | quote }}
prometheus.io/path: /metrics
{{- end -}}

{{/* Readiness and liveness probes of warren's processes, on their "http" port. */}}
{{- define "warren.probes" -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
{{- end -}}

{{/*
A container's env: the chart's own variables, then the component's extraEnv (after
them, so an extra variable may refer to the chart's as $(NAME)). Refuses an extraEnv
entry whose name the chart sets already or that repeats one: a duplicate name is
ambiguous for Kubernetes and for server-side apply; set the chart's value instead.
Call with (dict "own" (include "<the component's env>" ...) "extra" <extraEnv> "key" "<values key>").
*/}}
{{- define "warren.env" -}}
{{- $names := list -}}
{{- range (.own | fromYamlArray) -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- range .extra -}}
{{- if has .name $names -}}
{{- fail (printf "%s: the variable %s is set twice (the chart sets it from its own values, or extraEnv repeats it); set the chart's value instead, or name it once" $.key .name) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- .own -}}
{{- with .extra }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/* Pod scheduling fields; call with the component's values. */}}
{{- define "warren.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* RabbitMQ node name of StatefulSet ordinal N; call with (dict "root" $ "ordinal" N). */}}
{{- define "warren.rabbitmq.nodeName" -}}
rabbit@{{ include "warren.rabbitmq.fullname" .root }}-{{ .ordinal }}.{{ include "warren.rabbitmq.headless" .root }}.{{ .root.Release.Namespace }}.svc.{{ .root.Values.rabbitmq.clusterDomain }}
{{- end -}}

{{/* Container security context of RabbitMQ's containers (the image's user 999). */}}
{{- define "warren.rabbitmq.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 999
runAsGroup: 999
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.rabbitmq.readOnlyRootFilesystem }}
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
The Prometheus that scrapes warren (metrics.prometheus), as one NetworkPolicy
`from` peer. Any NetworkPolicy guarding a metrics port includes it.
*/}}
{{- define "warren.prometheusPeer" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .Values.metrics.prometheus.namespace | quote }}
  {{- with .Values.metrics.prometheus.podSelector }}
  podSelector:
    matchLabels:
      {{- toYaml . | nindent 6 }}
  {{- end }}
{{- end -}}

{{/* Whether the chart runs its own PostgreSQL (auth on, no external database). */}}
{{- define "warren.postgres.enabled" -}}
{{- if and .Values.auth.enabled (not .Values.auth.database.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* WARREN_DATABASE_URL from the chart's PostgreSQL Secret or the external one. */}}
{{- define "warren.databaseEnv" -}}
- name: WARREN_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.auth.database.existingSecret }}
      name: {{ .Values.auth.database.existingSecret }}
      key: {{ .Values.auth.database.urlKey }}
      {{- else }}
      name: {{ include "warren.postgres.fullname" . }}
      key: url
      {{- end }}
{{- end -}}

{{/*
The worker pools, resolved, as JSON (use: include "warren.workerPools" . | fromJsonArray).
Each pool is the worker values with the pool's own keys replacing them (a shallow
replace: a pool's resources replace the worker's whole resources), plus:
  name        the pool name; fullname  the Deployment name "<fullname>-<name>";
  queues      the queues it consumes (empty in values: [queue.name]);
  queueScaler the top-level queueScaler with the pool's queueScaler keys replacing
              them, and its object name.
Refuses to render (fail) when two pools share a name or a QueueScaler name, or when
a queue the sender accepts (queue.name, queue.extra) is consumed by no pool.
*/}}
{{- define "warren.workerPools" -}}
{{- $root := . -}}
{{- $fullname := include "warren.fullname" . -}}
{{- $base := omit .Values.worker "pools" -}}
{{- $pools := list -}}
{{- $names := list -}}
{{- $scalerNames := list -}}
{{- $consumed := list -}}
{{- range $pool := .Values.worker.pools -}}
{{- if has $pool.name $names -}}
{{- fail (printf "worker.pools: two pools are named %q; pool names must be unique" $pool.name) -}}
{{- end -}}
{{- $names = append $names $pool.name -}}
{{- $p := deepCopy $base -}}
{{- range $key, $value := $pool -}}
{{- if not (has $key (list "name" "queues" "queueScaler")) -}}
{{- $_ := set $p $key $value -}}
{{- end -}}
{{- end -}}
{{- $queues := $pool.queues | default (list $root.Values.queue.name) | uniq -}}
{{- $scaler := deepCopy (omit $root.Values.queueScaler "name") -}}
{{- range $key, $value := ($pool.queueScaler | default dict) -}}
{{- $_ := set $scaler $key $value -}}
{{- end -}}
{{- $scalerName := printf "%s-%s" $fullname $pool.name -}}
{{- if and (eq $pool.name "worker") $root.Values.queueScaler.name -}}
{{- $scalerName = $root.Values.queueScaler.name -}}
{{- end -}}
{{- if and $pool.queueScaler $pool.queueScaler.name -}}
{{- $scalerName = $pool.queueScaler.name -}}
{{- end -}}
{{- if $scaler.enabled -}}
{{- if has $scalerName $scalerNames -}}
{{- fail (printf "worker.pools: two QueueScalers would be named %q; set a distinct queueScaler.name on one pool" $scalerName) -}}
{{- end -}}
{{- $scalerNames = append $scalerNames $scalerName -}}
{{- end -}}
{{- $_ := set $scaler "name" $scalerName -}}
{{- $_ := set $p "name" $pool.name -}}
{{- $_ := set $p "fullname" (printf "%s-%s" $fullname $pool.name) -}}
{{- $_ := set $p "queues" $queues -}}
{{- $_ := set $p "queueScaler" $scaler -}}
{{- $pools = append $pools $p -}}
{{- $consumed = concat $consumed $queues -}}
{{- end -}}
{{- range $queue := prepend (.Values.queue.extra | default list) .Values.queue.name -}}
{{- if not (has $queue $consumed) -}}
{{- fail (printf "the sender accepts queue %q (queue.name / queue.extra) but no worker pool consumes it, so its jobs would never be processed: add it to a pool's queues, e.g. --set-json 'worker.pools=[{\"name\":\"worker\"},{\"name\":\"worker-%s\",\"queues\":[\"%s\"]}]'" $queue (regexReplaceAll "[^a-z0-9-]" (lower $queue) "-" | trunc 15 | trimSuffix "-") $queue) -}}
{{- end -}}
{{- end -}}
{{- toJson $pools -}}
{{- end -}}
