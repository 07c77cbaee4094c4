FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p push-server

FROM debian:bookworm-slim
COPY --from=build /src/target/release/push-server /usr/local/bin/push-server
VOLUME /data
EXPOSE 7443 7444
ENTRYPOINT ["push-server"]
CMD ["serve", "--data-dir", "/data"]
