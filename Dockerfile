# One image per service: docker build --build-arg EXTRAS=monitor -t torchrelay-monitor .
# EXTRAS picks the service's dependency group, so ingest and monitor images carry no torch.
FROM python:3.11-slim
ARG EXTRAS=monitor
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY torchrelay ./torchrelay
RUN pip install --no-cache-dir ".[${EXTRAS}]" \
 && useradd --uid 10001 --no-create-home torchrelay
USER 10001
ENTRYPOINT ["torchrelay"]
