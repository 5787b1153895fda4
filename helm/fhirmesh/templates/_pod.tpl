{{/* The pod template of one component: (dict "root" $ "component" NAME "values" BLOCK
"args" LIST). Probes: /healthz (liveness, startup) and /readyz (readiness) on the http port for
the gateway and the embedded server, on the ops port for every other service. */}}
{{- define "fhirmesh.podTemplate" -}}
{{- $root := .root -}}
{{- $name := .component -}}
{{- $svc := .values -}}
{{- $grpcPort := include "fhirmesh.grpcPort" . -}}
{{- $http := include "fhirmesh.servesHttp" . -}}
{{- $probePort := ternary "http" "metrics" (eq $http "true") -}}
metadata:
  labels:
    {{- include "fhirmesh.componentSelectorLabels" (dict "root" $root "component" $name) | nindent 4 }}
    app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "fhirmesh.toml" $root | sha256sum }}
    {{- if $root.Values.secret.create }}
    checksum/secret: {{ toJson $root.Values.secret.data | sha256sum }}
    {{- end }}
    {{- with (merge (dict) ($svc.podAnnotations | default dict) ($root.Values.podAnnotations | default dict)) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "fhirmesh.serviceAccountName" (dict "root" $root "component" $name) }}
  # No Kubernetes API access is needed (IRSA's web identity token is mounted by EKS separately).
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "fhirmesh.terminationGrace" $root }}
  containers:
    - name: fhirmesh
      image: {{ include "fhirmesh.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args:
        {{- toYaml .args | nindent 8 }}
      ports:
        {{- if eq $http "true" }}
        - name: http
          containerPort: {{ int $root.Values.ports.http }}
          protocol: TCP
        {{- else }}
        {{- if $grpcPort }}
        - name: grpc
          containerPort: {{ $grpcPort }}
          protocol: TCP
        {{- end }}
        - name: metrics
          containerPort: {{ int $root.Values.ports.ops }}
          protocol: TCP
        {{- end }}
      env:
        - name: FHIRMESH_CONFIG
          value: /etc/fhirmesh/fhirmesh.toml
        {{- with $root.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $svc.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or $root.Values.secret.create $root.Values.existingSecret $root.Values.extraEnvFrom }}
      envFrom:
        {{- if $root.Values.secret.create }}
        - secretRef:
            name: {{ include "fhirmesh.secretName" $root }}
        {{- end }}
        {{- if $root.Values.existingSecret }}
        - secretRef:
            name: {{ $root.Values.existingSecret }}
        {{- end }}
        {{- with $root.Values.extraEnvFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      startupProbe:
        httpGet:
          path: /healthz
          port: {{ $probePort }}
        {{- toYaml $root.Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: {{ $probePort }}
        {{- toYaml $root.Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: {{ $probePort }}
        {{- toYaml $root.Values.probes.readiness | nindent 8 }}
      {{- with $svc.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/fhirmesh
          readOnly: true
        - name: data
          mountPath: /data
        - name: tmp
          mountPath: /tmp
        {{- if eq (include "fhirmesh.grpcTls" $root) "true" }}
        - name: grpc-tls
          mountPath: /etc/fhirmesh-grpc-tls
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "fhirmesh.fullname" $root }}-config
    {{- if eq $name "server" }}
    {{- if $root.Values.persistence.enabled }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ default (printf "%s-data" (include "fhirmesh.fullname" $root)) $root.Values.persistence.existingClaim }}
    {{- else }}
    - name: data
      emptyDir: {}
    {{- end }}
    {{- else }}
    # Scratch space under storage.data_dir (the notifier's dead-letter file); the mesh keeps its
    # state in DynamoDB, OpenSearch, the bus and S3.
    - name: data
      emptyDir:
        sizeLimit: 1Gi
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 256Mi
    {{- if eq (include "fhirmesh.grpcTls" $root) "true" }}
    - name: grpc-tls
      secret:
        secretName: {{ $root.Values.grpcTls.secretName }}
        defaultMode: 0440
    {{- end }}
  {{- with $svc.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $svc.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $svc.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $svc.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
