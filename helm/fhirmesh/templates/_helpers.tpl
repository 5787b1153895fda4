{{/* vim: set filetype=mustache: */}}

{{/* The chart name. */}}
{{- define "fhirmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: every object's name starts with it (kept short enough for a
service name with a "-notifier" suffix). */}}
{{- define "fhirmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fhirmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "fhirmesh.labels" -}}
helm.sh/chart: {{ include "fhirmesh.chart" . }}
{{ include "fhirmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fhirmesh
{{- end -}}

{{/* Labels that select the release's pods. */}}
{{- define "fhirmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fhirmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component's objects: (dict "root" $ "component" "gateway"). */}}
{{- define "fhirmesh.componentLabels" -}}
{{ include "fhirmesh.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels that select one component's pods: (dict "root" $ "component" "gateway"). */}}
{{- define "fhirmesh.componentSelectorLabels" -}}
{{ include "fhirmesh.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The mesh services, in the order they are rendered. */}}
{{- define "fhirmesh.meshComponents" -}}
gateway resource relay indexer notifier exporter binary
{{- end -}}

{{/* The enabled components of this release, space-separated ("server" in the embedded
profile). */}}
{{- define "fhirmesh.components" -}}
{{- if eq .Values.profile "embedded" -}}
server
{{- else -}}
{{- $enabled := list -}}
{{- range $name := splitList " " (include "fhirmesh.meshComponents" .) -}}
{{- if (index $.Values $name).enabled -}}
{{- $enabled = append $enabled $name -}}
{{- end -}}
{{- end -}}
{{- join " " $enabled -}}
{{- end -}}
{{- end -}}

{{/* A component's values block ("server" → .Values.embedded). */}}
{{- define "fhirmesh.componentValues" -}}
{{- if eq .component "server" -}}
{{- toJson .root.Values.embedded -}}
{{- else -}}
{{- toJson (index .root.Values .component) -}}
{{- end -}}
{{- end -}}

{{/* The gRPC port a component serves, or "" (gateway, relay, indexer, notifier, server). */}}
{{- define "fhirmesh.grpcPort" -}}
{{- $ports := .root.Values.ports -}}
{{- if eq .component "resource" -}}{{ int $ports.resourceGrpc }}
{{- else if eq .component "exporter" -}}{{ int $ports.exporterGrpc }}
{{- else if eq .component "binary" -}}{{ int $ports.binaryGrpc }}
{{- end -}}
{{- end -}}

{{/* Whether a component serves the FHIR HTTP API (and its health and metrics) on ports.http;
every other one serves them on ports.ops. */}}
{{- define "fhirmesh.servesHttp" -}}
{{- if or (eq .component "gateway") (eq .component "server") -}}true{{- end -}}
{{- end -}}

{{/* The ServiceAccount a component's pods run as. */}}
{{- define "fhirmesh.serviceAccountName" -}}
{{- $root := .root -}}
{{- $sa := $root.Values.serviceAccount -}}
{{- if and $sa.create $sa.perService -}}
{{- printf "%s-%s" (include "fhirmesh.fullname" $root) .component -}}
{{- else if $sa.create -}}
{{- default (include "fhirmesh.fullname" $root) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the chart creates for extra environment variables. */}}
{{- define "fhirmesh.secretName" -}}
{{- printf "%s-env" (include "fhirmesh.fullname" .) -}}
{{- end -}}

{{- define "fhirmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The in-cluster URL of a component's gRPC service. */}}
{{- define "fhirmesh.grpcEndpoint" -}}
{{- $scheme := ternary "https" "http" (eq (include "fhirmesh.grpcTls" .root) "true") -}}
{{- printf "%s://%s-%s:%s" $scheme (include "fhirmesh.fullname" .root) .component (include "fhirmesh.grpcPort" .) -}}
{{- end -}}

{{/* "true" when the mesh's gRPC calls go over TLS (grpcTls.enabled, a mesh profile). */}}
{{- define "fhirmesh.grpcTls" -}}
{{- and .Values.grpcTls.enabled (ne .Values.profile "embedded") -}}
{{- end -}}

{{/* Refuses value combinations that render but cannot work. */}}
{{- define "fhirmesh.checks" -}}
{{- $cfg := .Values.config | default dict -}}
{{- $section := dict -}}
{{- if ne .Values.profile "embedded" -}}
{{- $storage := (get $cfg "storage" | default dict) -}}
{{- if ne (get $storage "backend" | default "sqlite") "dynamodb" -}}
{{- fail "profile aws/in-cluster (the mesh) needs config.storage.backend = dynamodb: SQLite lives in one pod (use profile embedded)" -}}
{{- end -}}
{{- $search := (get $cfg "search" | default dict) -}}
{{- if ne (get $search "backend" | default "sqlite") "opensearch" -}}
{{- fail "profile aws/in-cluster (the mesh) needs config.search.backend = opensearch: the SQLite index lives in one pod" -}}
{{- end -}}
{{- $bus := (get $cfg "bus" | default dict) -}}
{{- if not (has (get $bus "backend" | default "in_process") (list "nats" "sns_sqs")) -}}
{{- fail "profile aws/in-cluster (the mesh) needs config.bus.backend = nats or sns_sqs" -}}
{{- end -}}
{{- $blob := (get $cfg "blob" | default dict) -}}
{{- if ne (get $blob "backend" | default "local") "s3" -}}
{{- fail "profile aws/in-cluster (the mesh) needs config.blob.backend = s3: local files are seen by one pod only" -}}
{{- end -}}
{{- $relay := (get $cfg "relay" | default dict) -}}
{{- if and .Values.relay.enabled (ne (get $relay "source" | default "change_log") "streams") -}}
{{- if or (gt (int .Values.relay.replicas) 1) .Values.relay.autoscaling.enabled .Values.relay.keda.enabled -}}
{{- fail "relay: with config.relay.source = change_log exactly one relay publishes; set relay.replicas = 1 (no autoscaling), or use relay.source = streams to share the work" -}}
{{- end -}}
{{- end -}}
{{- range $name := splitList " " (include "fhirmesh.meshComponents" .) -}}
{{- $svc := index $.Values $name -}}
{{- if and $svc.autoscaling.enabled $svc.keda.enabled -}}
{{- fail (printf "%s: autoscaling (HPA) and keda are exclusive (KEDA makes its own HPA)" $name) -}}
{{- end -}}
{{- if and $svc.keda.enabled (not $svc.keda.triggers) -}}
{{- fail (printf "%s.keda.enabled needs %s.keda.triggers" $name $name) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.grpcTls.enabled (not .Values.grpcTls.secretName) -}}
{{- fail "grpcTls.enabled needs grpcTls.secretName: a Secret with ca.crt, tls.crt and tls.key" -}}
{{- end -}}
{{- if not .Values.gateway.enabled -}}
{{- fail "gateway.enabled = false: the gateway is the FHIR API; a mesh without it serves nothing" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.secret.create .Values.existingSecret -}}
{{- fail "secret.create and existingSecret are exclusive" -}}
{{- end -}}
{{- end -}}

{{/* The effective configuration as JSON: .Values.config with the keys the chart owns set over
it (listen addresses, in-cluster endpoints, data_dir). */}}
{{- define "fhirmesh.effectiveConfig" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $p := .Values.ports -}}
{{- $set := dict -}}
{{- $_ := set $set "server" (dict "listen" (printf "0.0.0.0:%d" (int $p.http))) -}}
{{- $_ := set $set "storage" (dict "data_dir" "/data") -}}
{{- if ne .Values.profile "embedded" -}}
{{- $_ := set $set "ops" (dict "listen" (printf "0.0.0.0:%d" (int $p.ops))) -}}
{{- $_ := set $set "resource" (dict "grpc_listen" (printf "0.0.0.0:%d" (int $p.resourceGrpc))) -}}
{{- $_ := set $set "export" (dict "grpc_listen" (printf "0.0.0.0:%d" (int $p.exporterGrpc))) -}}
{{- $_ := set $set "binary" (dict "grpc_listen" (printf "0.0.0.0:%d" (int $p.binaryGrpc))) -}}
{{- $gateway := dict "resource_endpoint" (include "fhirmesh.grpcEndpoint" (dict "root" . "component" "resource")) -}}
{{- if .Values.exporter.enabled -}}
{{- $_ := set $gateway "export_endpoint" (include "fhirmesh.grpcEndpoint" (dict "root" . "component" "exporter")) -}}
{{- end -}}
{{- if .Values.binary.enabled -}}
{{- $_ := set $gateway "binary_endpoint" (include "fhirmesh.grpcEndpoint" (dict "root" . "component" "binary")) -}}
{{- end -}}
{{- $_ := set $set "gateway" $gateway -}}
{{- $_ := set $set "notifier" (dict "resource_endpoint" (include "fhirmesh.grpcEndpoint" (dict "root" . "component" "resource"))) -}}
{{- if eq (include "fhirmesh.grpcTls" .) "true" -}}
{{- $_ := set $set "grpc" (dict "tls_ca_file" "/etc/fhirmesh-grpc-tls/ca.crt" "tls_cert_file" "/etc/fhirmesh-grpc-tls/tls.crt" "tls_key_file" "/etc/fhirmesh-grpc-tls/tls.key" "tls_client_auth" .Values.grpcTls.clientAuth) -}}
{{- end -}}
{{- end -}}
{{- toJson (mergeOverwrite $cfg $set) -}}
{{- end -}}

{{/* One TOML value: (dict "v" VALUE "path" "section.key"). */}}
{{- define "fhirmesh.tomlValue" -}}
{{- $v := .v -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- ternary "true" "false" $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq (floor $v) $v -}}{{- printf "%d" (int64 $v) -}}{{- else -}}{{- toString $v -}}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- printf "%d" $v -}}
{{- else if kindIs "slice" $v -}}
{{- $items := list -}}
{{- range $item := $v -}}
{{- $items = append $items (include "fhirmesh.tomlValue" (dict "v" $item "path" $.path)) -}}
{{- end -}}
[{{ join ", " $items }}]
{{- else -}}
{{- fail (printf "config.%s: %s values have no TOML form here (give a string, number, boolean or list)" .path (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/* The configuration file (TOML). Sections and keys sorted; null and "" left out (the binary's
default). */}}
{{- define "fhirmesh.toml" -}}
{{- $cfg := fromJson (include "fhirmesh.effectiveConfig" .) -}}
# fhirmesh configuration rendered by the Helm chart {{ include "fhirmesh.chart" . }} (profile {{ .Values.profile }}).
# FHIRMESH_<SECTION>__<KEY> environment variables win over this file.
{{- range $section := keys $cfg | sortAlpha }}
{{- $body := get $cfg $section }}
{{- if not (kindIs "map" $body) }}
{{- fail (printf "config.%s must be a section (a map of keys to values)" $section) }}
{{- end }}
{{- $lines := list }}
{{- range $key := keys $body | sortAlpha }}
{{- $v := get $body $key }}
{{- if not (or (kindIs "invalid" $v) (and (kindIs "string" $v) (eq $v ""))) }}
{{- $lines = append $lines (printf "%s = %s" $key (include "fhirmesh.tomlValue" (dict "v" $v "path" (printf "%s.%s" $section $key)))) }}
{{- end }}
{{- end }}
{{- if $lines }}

[{{ $section }}]
{{ join "\n" $lines }}
{{- end }}
{{- end }}
{{ end -}}

{{/* terminationGracePeriodSeconds: longer than the binary's own drain. */}}
{{- define "fhirmesh.terminationGrace" -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- int .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- $ops := (get (.Values.config | default dict) "ops") | default dict -}}
{{- $grace := (get $ops "shutdown_grace_seconds") | default 30 -}}
{{- $drain := (get $ops "drain_delay_seconds") | default 0 -}}
{{- add (int $drain) (int $grace) 10 -}}
{{- end -}}
{{- end -}}
