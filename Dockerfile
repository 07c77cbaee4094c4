FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p push-server -p apns-bridge

FROM debian:bookworm-slim
COPY --from=build /src/target/release/push-server /usr/local/bin/push-server
COPY --from=build /src/target/release/apns-bridge /usr/local/bin/apns-bridge
VOLUME /data
EXPOSE 7443 7444 7445 7450
ENTRYPOINT ["push-server"]
CMD ["serve", "--data-dir", "/data"]
