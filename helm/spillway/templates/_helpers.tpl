{{/*
==============================================================================
 Chart-internal helpers
==============================================================================
*/}}

{{- define "spillway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spillway.fullname" -}}
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

{{- define "spillway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spillway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spillway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spillway.labels" -}}
helm.sh/chart: {{ include "spillway.chart" . }}
{{ include "spillway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "spillway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spillway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Whole seconds (rounded up) in a Spillway duration: 250ms, 5s, 1m30s, 1.5s.
*/}}
{{- define "spillway.durationSeconds" -}}
{{- $d := toString . | trim -}}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$" $d) -}}
{{- fail (printf "cannot read the duration %q: write it with a unit, e.g. 250ms, 5s or 1m30s" $d) -}}
{{- end -}}
{{- $scale := dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 -}}
{{- $total := 0.0 -}}
{{- range $part := regexFindAll "[0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h)" $d -1 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $part | float64 -}}
{{- $unit := regexReplaceAll "^[0-9]+(\\.[0-9]+)?" $part "" -}}
{{- $total = addf $total (mulf $num (get $scale $unit)) -}}
{{- end -}}
{{- /* float noise (1000 x 0.001) must not round a whole second up */ -}}
{{- subf $total 0.000001 | ceil | int | max 0 -}}
{{- end }}

{{/*
==============================================================================
 Public API: spillway.sidecar.*

 For charts that put Spillway beside their own containers. Each template
 takes a dict:
   top     the calling chart's root context ($)
   values  Spillway's values (this chart's values.yaml shape; as a dependency
           named spillway: .Values.spillway)
   name    optional base name for the ConfigMap (default: the release name)
 Example: docs/kubernetes.md ("From another chart").
==============================================================================
*/}}

{{/* Name of the ConfigMap holding spillway.yaml. */}}
{{- define "spillway.sidecar.configMapName" -}}
{{- $base := .name | default .top.Release.Name -}}
{{- if hasSuffix "spillway" $base -}}
{{- printf "%s-config" $base | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-spillway-config" $base | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/*
Spillway's config file (YAML): values.config with listeners and admin filled
from proxy.ports when left out, and checked against them when given.
*/}}
{{- define "spillway.sidecar.config" -}}
{{- $v := .values -}}
{{- $http := int $v.proxy.ports.http -}}
{{- $admin := int $v.proxy.ports.admin -}}
{{- $cfg := deepCopy $v.config -}}
{{- /* Helm reads values as YAML 1.1, where an unquoted `on:` key is the
       boolean true: `retries: {on: [...]}` arrives as {"true": [...]}. No
       other retries field is a YAML 1.1 boolean word, so put it back. */ -}}
{{- $retries := list -}}
{{- range $r := $cfg.routes | default list -}}
{{- if kindIs "map" $r.retries }}{{ $retries = append $retries $r.retries }}{{ end -}}
{{- end -}}
{{- if and (kindIs "map" $cfg.defaults) (kindIs "map" (($cfg.defaults | default dict).retries)) -}}
{{- $retries = append $retries $cfg.defaults.retries -}}
{{- end -}}
{{- range $r := $retries -}}
{{- if hasKey $r "true" -}}
{{- $_ := set $r "on" (get $r "true") -}}
{{- $_ := unset $r "true" -}}
{{- end -}}
{{- end -}}
{{- if not $cfg.listeners -}}
{{- $_ := set $cfg "listeners" (list (dict "name" "inbound" "bind" (printf "0.0.0.0:%d" $http))) -}}
{{- end -}}
{{- $first := first $cfg.listeners -}}
{{- if not (hasSuffix (printf ":%d" $http) (toString $first.bind)) -}}
{{- fail (printf "config.listeners[0].bind is %q but proxy.ports.http is %d: the Service and the probes use proxy.ports, so make them agree" (toString $first.bind) $http) -}}
{{- end -}}
{{- if not $cfg.admin -}}
{{- $_ := set $cfg "admin" (dict "bind" (printf "0.0.0.0:%d" $admin)) -}}
{{- end -}}
{{- if not (hasSuffix (printf ":%d" $admin) (toString $cfg.admin.bind)) -}}
{{- fail (printf "config.admin.bind is %q but proxy.ports.admin is %d: the probes and Prometheus use proxy.ports, so make them agree" (toString $cfg.admin.bind) $admin) -}}
{{- end -}}
{{- if hasPrefix "127." (toString $cfg.admin.bind) -}}
{{- fail "config.admin.bind is on loopback: the kubelet's probes and Prometheus could not reach it; bind 0.0.0.0 (the NetworkPolicy limits who may connect)" -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end }}

{{/* The ConfigMap (a whole object). */}}
{{- define "spillway.sidecar.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "spillway.sidecar.configMapName" . }}
  namespace: {{ .top.Release.Namespace }}
  labels:
    app.kubernetes.io/component: spillway-config
    app.kubernetes.io/instance: {{ .top.Release.Name }}
    app.kubernetes.io/managed-by: {{ .top.Release.Service }}
data:
  spillway.yaml: |
{{ include "spillway.sidecar.config" . | indent 4 }}
{{- end }}

{{/* drain.grace and drain.timeout in whole seconds (defaults 5s / 30s, docs/config.md). */}}
{{- define "spillway.sidecar.drainSeconds" -}}
{{- $drain := .values.config.drain | default dict -}}
{{- $grace := include "spillway.durationSeconds" ($drain.grace | default "5s") | int -}}
{{- $timeout := include "spillway.durationSeconds" ($drain.timeout | default "30s") | int -}}
{{- dict "grace" $grace "timeout" $timeout | toJson -}}
{{- end }}

{{/* Seconds the app's preStop waits (0 when off). */}}
{{- define "spillway.sidecar.appPreStopSeconds" -}}
{{- $p := .values.app.preStop -}}
{{- if not $p.enabled -}}
0
{{- else if not (kindIs "invalid" $p.seconds) -}}
{{- int $p.seconds -}}
{{- else -}}
{{- $d := include "spillway.sidecar.drainSeconds" . | fromJson -}}
{{- if .values.proxy.nativeSidecar -}}
{{- int $d.grace -}}
{{- else -}}
{{- add $d.grace $d.timeout -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
terminationGracePeriodSeconds: long enough that Kubernetes never kills a
draining proxy. With a native sidecar the app stops first (after its preStop),
then Spillway drains; with a plain container both run at once.
*/}}
{{- define "spillway.sidecar.terminationGracePeriodSeconds" -}}
{{- $d := include "spillway.sidecar.drainSeconds" . | fromJson -}}
{{- $drain := add $d.grace $d.timeout -}}
{{- $preStop := include "spillway.sidecar.appPreStopSeconds" . | int -}}
{{- $needed := $drain -}}
{{- if .values.proxy.nativeSidecar -}}
{{- $needed = add $drain $preStop -}}
{{- else -}}
{{- $needed = max $drain $preStop -}}
{{- end -}}
{{- $set := .values.proxy.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $set -}}
{{- add $needed (int .values.proxy.terminationGraceExtraSeconds) -}}
{{- else if lt (int $set) (int $needed) -}}
{{- fail (printf "proxy.terminationGracePeriodSeconds is %d but Spillway needs %d s to drain (drain.grace %d s + drain.timeout %d s%s): Kubernetes would kill a draining proxy. Raise it, or set it to null to derive it." (int $set) (int $needed) (int $d.grace) (int $d.timeout) (ternary (printf " + the app's preStop %d s" $preStop) "" (and .values.proxy.nativeSidecar (gt $preStop 0)))) -}}
{{- else -}}
{{- int $set -}}
{{- end -}}
{{- end }}

{{/* Pod annotations Spillway needs (a YAML map, possibly empty). */}}
{{- define "spillway.sidecar.podAnnotations" -}}
{{- $v := .values -}}
{{- $a := dict -}}
{{- if $v.metrics.scrapeAnnotations -}}
{{- $_ := set $a "prometheus.io/scrape" "true" -}}
{{- $_ := set $a "prometheus.io/port" (toString (int $v.proxy.ports.admin)) -}}
{{- $_ := set $a "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- if $v.proxy.restartOnConfigChange -}}
{{- $_ := set $a "checksum/spillway-config" (include "spillway.sidecar.config" . | sha256sum) -}}
{{- end -}}
{{- if $a -}}
{{- toYaml $a -}}
{{- end -}}
{{- end }}

{{/* The Spillway container (a YAML map, not a list item). */}}
{{- define "spillway.sidecar.container" -}}
{{- $v := .values -}}
{{- $p := $v.proxy -}}
{{- if and $p.nativeSidecar (semverCompare "<1.29.0-0" .top.Capabilities.KubeVersion.Version) -}}
{{- fail (printf "proxy.nativeSidecar needs Kubernetes >= 1.29 (this cluster: %s); set proxy.nativeSidecar=false to run Spillway as a plain container" .top.Capabilities.KubeVersion.Version) -}}
{{- end -}}
name: {{ $p.name }}
image: "{{ $p.image.repository }}:{{ $p.image.tag }}"
imagePullPolicy: {{ $p.image.pullPolicy }}
{{- if $p.nativeSidecar }}
# A native sidecar: started before the app containers, stopped after them.
restartPolicy: Always
{{- end }}
args:
  - --log-format
  - {{ $p.logFormat }}
  - --log
  - {{ $p.logLevel | quote }}
  - run
  - --config
  - {{ printf "%s/spillway.yaml" (trimSuffix "/" $p.configDir) }}
{{- range $p.extraArgs }}
  - {{ . | quote }}
{{- end }}
ports:
  - name: spillway
    containerPort: {{ int $p.ports.http }}
    protocol: TCP
  - name: spillway-admin
    containerPort: {{ int $p.ports.admin }}
    protocol: TCP
{{- with $p.env }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $p.probes.startup.enabled }}
startupProbe:
  httpGet:
    path: /ready
    port: spillway-admin
  periodSeconds: {{ int $p.probes.startup.periodSeconds }}
  failureThreshold: {{ int $p.probes.startup.failureThreshold }}
  timeoutSeconds: {{ int $p.probes.startup.timeoutSeconds }}
{{- end }}
readinessProbe:
  httpGet:
    path: /ready
    port: spillway-admin
  periodSeconds: {{ int $p.probes.readiness.periodSeconds }}
  failureThreshold: {{ int $p.probes.readiness.failureThreshold }}
  successThreshold: {{ int $p.probes.readiness.successThreshold }}
  timeoutSeconds: {{ int $p.probes.readiness.timeoutSeconds }}
livenessProbe:
  httpGet:
    path: /live
    port: spillway-admin
  periodSeconds: {{ int $p.probes.liveness.periodSeconds }}
  failureThreshold: {{ int $p.probes.liveness.failureThreshold }}
  timeoutSeconds: {{ int $p.probes.liveness.timeoutSeconds }}
resources:
  {{- toYaml $p.resources | nindent 2 }}
securityContext:
  {{- toYaml $p.securityContext | nindent 2 }}
volumeMounts:
  # The whole directory, never subPath: Kubernetes updates a ConfigMap by
  # swapping a symlink, which Spillway's directory watch sees and reloads.
  - name: spillway-config
    mountPath: {{ $p.configDir }}
    readOnly: true
{{- end }}

{{/* List items for initContainers: Spillway when it is a native sidecar. */}}
{{- define "spillway.sidecar.initContainers" -}}
{{- if .values.proxy.nativeSidecar -}}
{{- include "spillway.sidecar.container" . | indent 2 | trim | printf "- %s" -}}
{{- end -}}
{{- end }}

{{/* List items for containers: Spillway when it is a plain container. */}}
{{- define "spillway.sidecar.containers" -}}
{{- if not .values.proxy.nativeSidecar -}}
{{- include "spillway.sidecar.container" . | indent 2 | trim | printf "- %s" -}}
{{- end -}}
{{- end }}

{{/* List items for volumes. */}}
{{- define "spillway.sidecar.volumes" -}}
- name: spillway-config
  configMap:
    name: {{ include "spillway.sidecar.configMapName" . }}
    defaultMode: 292 # 0444
{{- end }}

{{/* The app container's lifecycle (a YAML map, empty when the preStop is off). */}}
{{- define "spillway.sidecar.appLifecycle" -}}
{{- $p := .values.app.preStop -}}
{{- if $p.enabled }}
{{- $secs := include "spillway.sidecar.appPreStopSeconds" . | int }}
preStop:
  {{- if eq $p.method "exec" }}
  exec:
    command: ["sleep", {{ $secs | quote }}]
  {{- else }}
  sleep:
    seconds: {{ $secs }}
  {{- end }}
{{- end }}
{{- end }}
